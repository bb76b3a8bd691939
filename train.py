"""Train, validate or test with LightningCLI: ``python train.py fit --config configs/shapes.yaml``.

See README.md ("Configs") for the shipped configs; any value can be overridden on the command line,
e.g. ``--trainer.max_epochs 2 --model.lr 3e-4 --data.train_path my.csv``.
"""

from mmxattn.lit.cli import main

if __name__ == "__main__":
    main()
