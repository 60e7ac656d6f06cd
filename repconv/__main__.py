from repconv.cli import main

if __name__ == "__main__":  # not when a multiprocessing server imports this as __mp_main__
    main(prog_name="repconv")
