from stampflow.cli import main

main()
