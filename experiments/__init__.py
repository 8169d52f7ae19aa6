"""Ablation suites of the paper (plain vs residual depth, shortcut options), run and reported.

python experiments/run_suite.py --suite=cifar10_degradation --workdir=DIR
python experiments/report.py --workdir=DIR --out=DIR/report
"""
