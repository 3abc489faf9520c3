from llava_train.cli import main

main()
