"""The demo on W&B: every phase a run of one group, job types saying which is which, the
report and summary plots as images (offline runs read back)."""

from __future__ import annotations

import pytest
from mp import run_python
from toy_demo import toy_script
from wandb_offline import read_offline_run

SCRIPT = toy_script(
    'run_demo(out, 0, False, DEMO, BASE, cache_dir=cache, wandb_mode="offline", wandb_group="exp-d")'
)


@pytest.mark.slow
def test_demo_phases_share_one_group_with_their_job_types(tmp_path):
    script = tmp_path / "toy_demo.py"
    script.write_text(SCRIPT)
    out = tmp_path / "demo"
    run_python(str(script), str(out), str(tmp_path / "cache"), timeout=900)
    runs = {name: read_offline_run(out / name) for name in ("sweep_base", "sept", "sweep_sept", ".")}
    assert {run.group for run in runs.values()} == {"exp-d"}
    assert {name: (run.job_type, run.name) for name, run in runs.items()} == {
        "sweep_base": ("sweep-base", "seed0-sweep-base"),
        "sept": ("train", "seed0-train"),
        "sweep_sept": ("sweep-sept", "seed0-sweep-sept"),
        ".": ("report", "seed0-report"),
    }
    assert "eval/curves" in runs["sweep_base"].config["_wandb"]["visualize"]
    assert "train/loss" in runs["sept"].history[2]
    report = runs["."].summary
    assert report["demo/report"]["_type"] == "image-file"
    assert "demo/mechanism_holds" in report


def test_the_seeds_summary_run_carries_the_summary_plot(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sept_megatron.demo.run import DemoWandb, _log_summary, log_demo_run

    png = tmp_path / "summary.png"
    figure, axes = plt.subplots(figsize=(2, 2))
    axes.plot([0, 1], [0, 1])
    figure.savefig(png)
    plt.close(figure)
    summary = {
        "seeds": [0, 1],
        "mechanism_holds_on": 2,
        "paper_claim_holds_on": 1,
        "stats": {"SePT T=1 AVG": {"mean": 0.6}},
    }
    log_demo_run(
        DemoWandb("offline", "exp-d"),
        tmp_path,
        "summary",
        "summary",
        lambda logger: _log_summary(logger, png, summary),
    )
    run = read_offline_run(tmp_path)
    assert (run.group, run.job_type, run.name) == ("exp-d", "summary", "summary")
    assert run.summary["demo/summary"]["_type"] == "image-file"
    assert run.summary["demo/mechanism_holds_on"] == 2
    assert run.summary["demo/SePT T=1 AVG/mean"] == 0.6
    # Disabled: nothing is started, nothing is written.
    log_demo_run(
        DemoWandb("disabled", "g"),
        tmp_path / "off",
        "summary",
        "summary",
        lambda logger: pytest.fail("no logger without W&B"),
    )
    assert not (tmp_path / "off").exists()
