from repconv.cli import main

main(prog_name="repconv")
