from cifarexp.cli import main

main()
