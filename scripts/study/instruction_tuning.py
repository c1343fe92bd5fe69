#!/usr/bin/env python3
"""CoLLiE's instruction-tuning comparison on collie-rs: seven optimizers (full fine-tuning) and six
PEFT methods with AdamW, on SmolLM2-135M-Instruct and recipe-sft's chatterbot data
(recipes/sft/configs/study.toml holds every shared setting).

    python3 scripts/study/instruction_tuning.py sweep    # lr per method: 3+ values, 1 seed, 12 steps
    python3 scripts/study/instruction_tuning.py final    # each method at its lr, seeds 1 and 2
    python3 scripts/study/instruction_tuning.py report   # docs/instruction_tuning.{json,png} + table

Each run is `recipe-sft --config recipes/sft/configs/study.toml --set ...` under
`/usr/bin/time -v` (peak RSS), one at a time (tokens/s is measured per run), in runs/study/. Every
run's numbers go to docs/instruction_tuning_{sweep,runs}.json; a phase skips the runs its file
already holds, so it can be resumed.
Standard library only, except `report`, which needs matplotlib for the plot
(`pip install -r scripts/study/requirements.txt`).
"""

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "recipes/sft/configs/study.toml"
RUNS = ROOT / "runs" / "study"
# Every run's numbers (no checkpoints), kept in git: the doc's raw data, and where a resumed
# phase finds what is done.
SWEEP_JSON = ROOT / "docs" / "instruction_tuning_sweep.json"
FINAL_JSON = ROOT / "docs" / "instruction_tuning_runs.json"

LORA = ["peft.kind=lora", "peft.r=16", "peft.alpha=32", "peft.dropout=0.05",
        "peft.target_modules=all-linear"]
VIRTUAL = ["peft.num_virtual_tokens=20"]

# name, group, extra --set keys, swept learning rates (3 around the method's usual value).
METHODS = [
    ("AdamW", "full", ["optim.name=adamw"], [3e-5, 1e-4, 3e-4]),
    ("SGD", "full", ["optim.name=sgd"], [1e-2, 3e-2, 1e-1]),
    ("Lion", "full", ["optim.name=lion"], [3e-6, 1e-5, 3e-5]),
    ("Adan", "full", ["optim.name=adan"], [3e-5, 1e-4, 3e-4]),
    ("SophiaG", "full", ["optim.name=sophiag"], [1e-5, 3e-5, 1e-4]),
    ("LOMO", "full", ["optim.name=lomo"], [1e-2, 3e-2, 1e-1]),
    ("AdaLomo", "full", ["optim.name=adalomo"], [3e-4, 1e-3, 3e-3]),
    ("LoRA r16", "peft", LORA, [3e-4, 1e-3, 3e-3]),
    ("IA3", "peft", ["peft.kind=ia3"], [1e-3, 3e-3, 1e-2]),
    ("Prompt tuning", "peft", ["peft.kind=prompt"] + VIRTUAL, [1e-2, 3e-2, 1e-1]),
    ("P-tuning", "peft", ["peft.kind=ptuning"] + VIRTUAL, [1e-3, 3e-3, 1e-2]),
    ("Prefix tuning", "peft", ["peft.kind=prefix"] + VIRTUAL, [1e-3, 3e-3, 1e-2]),
    # QLoRA is LoRA on a 4-bit base: it takes LoRA's learning rate rather than a sweep of its own.
    ("QLoRA r16 (q4_k)", "peft", LORA + ["model.quantize=q4_k"], "LoRA r16"),
]
SEEDS = [1, 2]
SWEEP_STEPS = 12
# The sweep scores held-out loss only: the task evaluators are the final runs' business.
SWEEP_OFF = ["eval.classification=", "eval.generation=", "recipe.classification_tasks=[]",
             "recipe.generation_questions=0"]


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def binary():
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    subprocess.run(["cargo", "build", "--release", "-p", "recipe-sft"], cwd=ROOT, check=True)
    return str(target / "release" / "recipe-sft")


def run(exe, out_dir, sets, may_fail=False):
    """One recipe-sft run; returns its summary, per-step losses and /usr/bin/time's peak RSS.
    A failed run ends the script, unless `may_fail` (a sweep's diverging lr is a result)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    cmd = ["/usr/bin/time", "-v", exe, "--config", CONFIG, "--set", f"output.dir={out_dir}"]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - t0
    (out_dir / "stderr.txt").write_text(proc.stderr)
    if proc.returncode != 0 and may_fail:
        lines = proc.stderr.splitlines()
        error = next((x for x in lines if x.startswith("error")), lines[-1] if lines else "")
        return {"failed": error, "eval_last": {"eval_loss": math.inf}}
    if proc.returncode != 0:
        sys.exit(f"run failed ({out_dir}/stderr.txt):\n" + proc.stderr[-2000:])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    summary = json.loads((out_dir / "summary.json").read_text())
    losses = []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        v = json.loads(line)
        if "loss" in v and "eval_loss" not in v:
            losses.append(math.nan if v["loss"] is None else v["loss"])
    # Checkpoints are 0.5-1.6 GB per full fine-tuning run; the study keeps the numbers only.
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    return {
        "eval_first": summary["eval_first"],
        "eval_last": summary["eval_last"],
        "tokens_per_sec": summary["tokens_per_sec"],
        "train_seconds": summary["train_seconds"],
        "final_loss": summary["final_loss"],
        "peak_rss_kib": rss,
        "trainable_params": summary["trainable_params"],
        "losses": losses,
        "wall_seconds": wall,
    }


def load(path):
    return json.loads(path.read_text()) if path.exists() else {}


def save(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def sweep(exe):
    """Each method's grid; where the best lr is at an end of it, one more lr ×3 beyond that end,
    up to twice."""
    path = SWEEP_JSON
    done = load(path)
    for name, _, sets, lrs in METHODS:
        if isinstance(lrs, str):
            continue
        lrs = list(lrs)
        for extension in range(3):
            for lr in lrs:
                key = f"{name} @ {lr:g}"
                if key in done:
                    continue
                r = run(exe, RUNS / "sweep" / f"{slug(name)}-{lr:g}",
                        sets + SWEEP_OFF + [f"optim.lr={lr!r}", f"train.max_steps={SWEEP_STEPS}"],
                        may_fail=True)
                done[key] = {"method": name, "lr": lr, **r}
                save(path, done)
                print(f"{key}: eval_loss {r['eval_last']['eval_loss']:.4f}", flush=True)
            best = chosen_lr(done, name)
            if extension == 2 or min(lrs) < best < max(lrs):
                break
            lrs = sorted(lrs + [float(f"{best * 3 if best == max(lrs) else best / 3:.3g}")])


def chosen_lr(sweep_runs, name):
    """The swept lr with the lowest held-out loss (a diverged run counts as +inf)."""
    rows = [r for r in sweep_runs.values() if r["method"] == name]
    if not rows:
        sys.exit(f"no sweep results for {name}: run the sweep first")

    def score(r):
        v = r["eval_last"]["eval_loss"]
        return v if math.isfinite(v) else math.inf

    return min(rows, key=score)["lr"]


def final(exe):
    sweep_runs = load(SWEEP_JSON)
    path = FINAL_JSON
    done = load(path)
    for name, group, sets, lrs in METHODS:
        lr = chosen_lr(sweep_runs, lrs if isinstance(lrs, str) else name)
        for seed in SEEDS:
            key = f"{name} / seed {seed}"
            if key in done:
                continue
            # The first run also evaluates the untrained model (the table's base row).
            first = [] if done else ["train.eval_on_start=true"]
            r = run(exe, RUNS / "final" / f"{slug(name)}-s{seed}",
                    sets + first + [f"optim.lr={lr!r}", f"train.seed={seed}"])
            done[key] = {"method": name, "group": group, "lr": lr, "seed": seed, **r}
            save(path, done)
            e = r["eval_last"]
            print(f"{key}: lr {lr:g} eval_loss {e['eval_loss']:.4f} acc {e['eval_accuracy']:.3f} "
                  f"rouge_l {e['eval_rouge_l']:.4f}", flush=True)


def report():
    sweep_runs = load(SWEEP_JSON)
    runs = load(FINAL_JSON)
    rows = []
    for name, group, _, _ in METHODS:
        rs = [r for r in runs.values() if r["method"] == name]
        if not rs:
            continue

        def stat(f):
            vals = [f(r) for r in rs]
            mean = sum(vals) / len(vals)
            return {"mean": mean, "spread": max(vals) - min(vals), "values": vals}

        rows.append({
            "method": name,
            "group": group,
            "lr": rs[0]["lr"],
            "sweep": {f"{r['lr']:g}": r["eval_last"]["eval_loss"]
                      for r in sweep_runs.values() if r["method"] == name},
            "trainable_params": rs[0]["trainable_params"],
            "peak_rss_mib": stat(lambda r: r["peak_rss_kib"] / 1024),
            "tokens_per_sec": stat(lambda r: r["tokens_per_sec"]),
            "eval_loss": stat(lambda r: r["eval_last"]["eval_loss"]),
            "accuracy": stat(lambda r: r["eval_last"]["eval_accuracy"]),
            "rouge_l": stat(lambda r: r["eval_last"]["eval_rouge_l"]),
            "losses": [r["losses"] for r in rs],
        })
    base = next((r["eval_first"] for r in runs.values() if r["eval_first"]), None)
    docs = ROOT / "docs"
    save(docs / "instruction_tuning.json", {"base": base, "rows": [
        {k: v for k, v in row.items() if k != "losses"} for row in rows]})
    print("| method | held-out loss after 12 steps, by lr (chosen in bold) |\n|---|---|")
    for row in rows:
        cells = [f"**{lr}: {v:.4f}**" if float(lr) == row["lr"] else f"{lr}: {v:.4f}"
                 for lr, v in sorted(row["sweep"].items(), key=lambda kv: float(kv[0]))]
        print(f"| {row['method']} | {', '.join(cells) or 'the rate of LoRA r16'} |")
    print()
    print("| method | lr | trainable | peak RSS MiB | tokens/s | held-out loss | sentiment acc |"
          " ROUGE-L |")
    print("|---|---|---|---|---|---|---|---|")
    if base:
        print(f"| base model (no training) | – | – | – | – | {base['eval_loss']:.4f} | "
              f"{base['eval_accuracy']:.3f} | {base['eval_rouge_l']:.4f} |")
    for row in rows:
        def pm(s, fmt):
            return f"{s['mean']:{fmt}} ± {s['spread'] / 2:{fmt}}"
        print(f"| {row['method']} | {row['lr']:g} | {row['trainable_params']:,} | "
              f"{row['peak_rss_mib']['mean']:,.0f} | {row['tokens_per_sec']['mean']:.1f} | "
              f"{pm(row['eval_loss'], '.4f')} | {pm(row['accuracy'], '.3f')} | "
              f"{pm(row['rouge_l'], '.4f')} |")
    # Which differences exceed the seed spread: the two methods' ranges over seeds do not overlap.
    for metric, better in [("eval_loss", "lower"), ("accuracy", "higher"), ("rouge_l", "higher")]:
        print(f"\n{metric} ({better} is better): beyond the seed spread, better than")
        for a in rows:
            va = a[metric]["values"]
            beats = [b["method"] for b in rows if b is not a and (
                max(va) < min(b[metric]["values"]) if better == "lower"
                else min(va) > max(b[metric]["values"]))]
            print(f"  {a['method']}: {', '.join(beats) if beats else '-'}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for ax, group, title in [(axes[0], "full", "full fine-tuning"),
                             (axes[1], "peft", "PEFT (AdamW)")]:
        for row in rows:
            if row["group"] != group:
                continue
            curves = row["losses"]
            n = min(len(c) for c in curves)
            mean = [sum(c[i] for c in curves) / len(curves) for i in range(n)]
            ax.plot(range(1, n + 1), mean, label=f"{row['method']} (lr {row['lr']:g})")
        ax.set_title(f"{title}: training loss, mean of {len(SEEDS)} seeds")
        ax.set_xlabel("step (4 conversations)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(docs / "instruction_tuning.png", dpi=110)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("phase", choices=["sweep", "final", "report"])
    p.add_argument("--bin", help="recipe-sft binary (default: cargo build --release)")
    a = p.parse_args()
    if a.phase == "report":
        report()
        return
    exe = a.bin or binary()
    (sweep if a.phase == "sweep" else final)(exe)


if __name__ == "__main__":
    main()
