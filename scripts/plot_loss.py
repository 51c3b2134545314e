"""Plot the loss curves that examples/train_lm.py writes with --loss-csv (needs matplotlib).

    python scripts/plot_loss.py OUT.png RUN.csv [LABEL] [RUN.csv LABEL ...]
"""

import csv
import sys


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip())
        return 2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, rest = sys.argv[1], sys.argv[2:]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    while rest:
        path, label = rest[0], rest[1] if len(rest) > 1 and not rest[1].endswith(".csv") else rest[0]
        rest = rest[2:] if label != path else rest[1:]
        with open(path) as fh:
            rows = list(csv.DictReader(fh))
        ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats per byte)")
    ax.set_title("examples/train_lm.py")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
