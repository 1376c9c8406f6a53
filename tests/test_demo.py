"""`rlm demo --quick`: the whole pipeline (train, sweep, compare, report) on tiny budgets."""

import csv
import json

from recurrent_lm.cli import main


def test_quick_demo_writes_the_report_and_every_promised_file(tmp_path, capsys):
    out = tmp_path / "demo"
    main(["demo", "--quick", "--out", str(out)])
    assert "wrote" in capsys.readouterr().out
    for name in ("report.md", "results.json", "accuracy_vs_flops.png", "accuracy_vs_depth.png",
                 "accuracy_vs_budget.png", "logit_lens.png", "compare/results.csv", "compare/s1_metrics.csv",
                 "sweep/results.csv", "train/demo-latent/model/manifest.json", "train/demo-cot/model/manifest.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert {"findings", "compare", "sweep", "s1_metrics", "manifests", "wall_seconds"} <= set(results)
    assert {r["method"] for r in results["compare"]} == {"latent", "latent-exit", "cot-budget", "cot-vote",
                                                        "cot-best-of-n"}
    assert {r["difficulty"] for r in results["compare"]} == {1, 2, 6}  # 6: harder than any trained
    manifest = results["manifests"]["latent"]
    assert {"config", "seed", "command", "machine", "wall_seconds", "final_metrics"} <= set(manifest)
    columns = next(csv.DictReader(open(out / "compare" / "results.csv"))).keys()
    assert {"method", "setting", "difficulty", "accuracy", "ci_low", "ci_high", "flops_per_problem"} <= set(columns)
    report = (out / "report.md").read_text()
    assert "![accuracy against FLOPs](accuracy_vs_flops.png)" in report and "Quick mode" in report
    assert all(line in report for line in results["findings"])
