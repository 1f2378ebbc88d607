from histotile.cli import main

main()
