from sessa_pt.train.main import main

main()
