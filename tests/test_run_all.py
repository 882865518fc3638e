"""run_all.sh: every printed command parses with its script's own argument parser (quick, smoke and paper
modes); --only / bad options; the executor (skip finished runs, --resume, failures reported at the end
without stopping the others) with a stand-in interpreter; and the whole --smoke pipeline (slow)."""
import json
import os
import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest

import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("clip_tail.py", "sl_tail.py", "dino_tail.py", "report.py")
DATA_VARS = ("IMAGENET_VAL", "INCAPS_ROOT", "LAIONET_TSV", "YFCC_TSV", "IMAGENET_TRAIN", "TRANSFER_ROOT",
             "CLIP_PRETRAINED", "CLIP_TEXT_INIT", "SL_HEAD", "SEEDS", "NPROC", "PYTHON")


def run_all(*args, env=None, check=True):
    full_env = {k: v for k, v in os.environ.items() if k not in DATA_VARS}
    full_env.update(env or {})
    proc = subprocess.run(["bash", "run_all.sh", *args], cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=1800)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def planned_commands(stdout):
    """The '+ <command>' lines of a dry run -> [(script, argv, launcher)] (launcher: python / torchrun ...)."""
    commands = []
    for line in stdout.splitlines():
        if not line.startswith("+ "):
            assert line.startswith("# "), f"a dry-run line is neither a command nor a remark: {line!r}"
            continue
        words = shlex.split(line[2:])
        k = next(i for i, w in enumerate(words) if w.endswith(".py"))
        commands.append((words[k], words[k + 1:], words[:k]))
    return commands


# Parsing runs in a child process: importing a script loads the compiled op (proto_ce), which parsing does
# not need, so the child uses PROTO_CE_BACKEND=reference without touching this test process's backend.
PARSE_ALL = r"""
import importlib, json, sys
commands = json.load(sys.stdin)
modules = {s: importlib.import_module(s[:-3]) for s in {s for s, _ in commands}}
if sys.argv[1] == "gpu":  # paper-scale commands ask for --amp, which the scripts only accept with a GPU
    import torch
    torch.cuda.is_available = lambda: True
print(json.dumps([vars(modules[s].parse_args(argv)) for s, argv in commands], default=str))
"""


def parse_with_scripts(commands, gpu=False):
    """[(script, argv)] -> [SimpleNamespace of the parsed args], each by its script's own parse_args(argv)."""
    env = dict(os.environ, PROTO_CE_BACKEND="reference")
    proc = subprocess.run([sys.executable, "-c", PARSE_ALL, "gpu" if gpu else "cpu"], cwd=REPO, env=env,
                          input=json.dumps(commands), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [SimpleNamespace(**a) for a in json.loads(proc.stdout.splitlines()[-1])]


def check_plan(commands, out, gpu=False):
    """Every command parses with its script's parser and writes into its own folder under `out`; the plan
    ends with report.py reading `out`. Returns {run folder name: parsed args} of the experiments."""
    assert commands and commands[-1][0] == "report.py"
    for script, _, _ in commands:
        assert script in SCRIPTS and os.path.isfile(os.path.join(REPO, script)), script
    parsed = parse_with_scripts([(s, a) for s, a, _ in commands], gpu)
    assert parsed[-1].runs == out
    runs = {}
    for args in parsed[:-1]:
        assert os.path.dirname(args.out) == out, args.out
        assert os.path.basename(args.out) not in runs, f"two runs share {args.out}"
        runs[os.path.basename(args.out)] = args
    assert runs, "no experiment planned"
    return runs


def planned_names(*argv):
    """Run folder names of a dry run, read from the --out of each command."""
    return {os.path.basename(a[a.index("--out") + 1]) for s, a, _ in planned_commands(run_all(*argv).stdout)
            if s != "report.py"}


def test_quick_dry_run_parses_with_every_scripts_parser():
    proc = run_all("--quick", "--dry-run")
    commands = planned_commands(proc.stdout)
    runs = check_plan(commands, "runs/quick")
    assert all(launcher == ["python"] for _, _, launcher in commands)
    # every section of the paper is there (one representative run each)
    for name in ("clip_template_s0", "sl_voc10_s0", "clip_laionet_s0", "clip_textpre_s0", "clip_frozen_frac0.25_s0",
                 "clip_ow100_s0", "sl-frozen-voc_tail0_s0", "clip-frozen_tail1_s0", "dino_voc64_s0",
                 "dino_small-head_s0", "dino_balanced_s0", "dino_random_s0"):
        assert name in runs, name
    # three seeds by default, one text-tower stand-in for all of them
    assert {"clip_template_s1", "clip_template_s2", "dino_voc64_s2"} <= set(runs) and "clip_textpre_s1" not in runs
    # Fig. 4 and Fig. 6 decide no claim: first seed only (Fig. 5's scale-1 run, Fig. 4's LAIONet run, keeps three)
    assert not {"clip_ow100_s1", "clip_laionet-diverse_s1", "clip_laionet_s1"} & set(runs)
    assert {"clip_scratch_frac1_s1", "clip_scratch_frac1_s2"} <= set(runs)
    assert runs["dino_random_s0"].epochs == 0 and runs["clip_textpre_s0"].distill_text == "clip-rn50"
    # one command, one run: shared configurations are listed once and linked
    assert "clip_ow0_s0 -> clip_title-desc-tags_s0 (same command)" in proc.stdout
    # the frozen runs use the text tower and head the pre-training run writes
    assert runs["clip_frozen_frac1_s0"].text_init == "runs/quick/clip_textpre_s0/checkpoint.pt"
    assert runs["clip_frozen_frac1_s0"].lock_text and not runs["clip_finetune_frac1_s0"].lock_text
    # CLIP's frozen text tower and SL's frozen prototypes come from the same text encoder (Fig. 8/9)
    assert runs["sl-frozen_tail0_s0"].head_file == runs["clip_textpre_s0"].export_head == \
        "runs/quick/clip_textpre_s0/head.pt"
    assert runs["sl-frozen-voc_tail0_s0"].voc > 0 and runs["sl-frozen-voc_tail0_s0"].tail_shots == 0
    assert runs["sl_voc20_s0"].voc == 20 and runs["clip_title-desc_s0"].caption_fields == "title,description"


def test_seeds_and_out_options(tmp_path):
    out = str(tmp_path / "elsewhere")
    proc = run_all("--quick", "--dry-run", "--seeds", "0 1", "--out", out, "--only", "fig3")
    runs = check_plan(planned_commands(proc.stdout), out)
    assert not os.path.exists(out)  # a dry run writes nothing
    seeds = {}
    for name, args in runs.items():
        assert name.endswith(f"_s{args.seed}")
        seeds.setdefault(name.rsplit("_s", 1)[0], set()).add(args.seed)
    assert seeds and all(v == {0, 1} for v in seeds.values())


def test_data_flags_reach_every_run_and_sections_keep_their_own(tmp_path):
    proc = run_all("--quick", "--dry-run", "--seeds", "0", "--data-flags", "--profile yfcc15m --diversity 0.6")
    runs = check_plan(planned_commands(proc.stdout), "runs/quick")
    experiments = {name: args for name, args in runs.items() if name != "clip_textpre_s0"}
    assert all(args.diversity == 0.6 for name, args in experiments.items() if name != "clip_laionet-diverse_s0")
    assert runs["clip_laionet-diverse_s0"].diversity == 1.0
    assert runs["clip_template_s0"].profile == runs["sl_voc0_s0"].profile == "yfcc15m"
    assert runs["clip_laionet_s0"].profile == "laionet-0.7" and runs["dino_balanced_s0"].profile == "uniform"
    assert runs["clip_textpre_s0"].profile == "uniform" and runs["clip_textpre_s0"].diversity != 0.6
    proc = run_all("--quick", "--dry-run", "--data-flags", "--seed 3", check=False)
    assert proc.returncode == 2 and "--data-flags: --seed is not a data flag" in proc.stderr


def test_only_selects_sections():
    assert planned_names("--quick", "--dry-run", "--seeds", "0", "--only", "fig9") == {
        "clip_textpre_s0", "clip-frozen_tail1_s0", "sl_tail1_s0", "sl-frozen_tail1_s0", "sl-frozen-voc_tail1_s0",
        "clip-frozen_tail0_s0", "sl_tail0_s0", "sl-frozen_tail0_s0", "sl-frozen-voc_tail0_s0"}
    fig7 = planned_names("--quick", "--dry-run", "--seeds", "0", "--only", "fig7")  # every run report.py's Fig. 7 compares
    assert {f"{exp}_s0" for _, exp in report.nc_runs({})} | {"sl_voc0_s0", "sl_voc20_s0"} <= fig7
    scripts = {s for s, _, _ in planned_commands(run_all("--quick", "--dry-run", "--only", "fig6,fig10").stdout)}
    assert scripts == {"clip_tail.py", "dino_tail.py", "report.py"}


def test_smoke_dry_run_parses():
    check_plan(planned_commands(run_all("--smoke", "--dry-run").stdout), "runs/smoke")


@pytest.fixture
def paper_env(tmp_path):
    """Fake data locations: the dry run only needs the variables set (the scripts check the files)."""
    env = {}
    for var in ("IMAGENET_VAL", "INCAPS_ROOT", "IMAGENET_TRAIN", "TRANSFER_ROOT"):
        (tmp_path / var).mkdir()
        env[var] = str(tmp_path / var)
    for var in ("LAIONET_TSV", "YFCC_TSV"):
        (tmp_path / f"{var}.tsv").write_text("filepath\tlabel\tcaption\n")
        env[var] = str(tmp_path / f"{var}.tsv")
    env["NPROC"] = "4"
    return env


def test_paper_dry_run_parses_with_every_scripts_parser(paper_env):
    proc = run_all("--dry-run", env=paper_env)
    commands = planned_commands(proc.stdout)
    runs = check_plan(commands, "runs/paper", gpu=True)
    assert all(launcher == ["torchrun", "--standalone", "--nproc_per_node=4"] for s, _, launcher in commands if s != "report.py")
    assert all(args.recipe == "paper" and args.amp for name, args in runs.items() if name != "fig1_pretrained")
    assert runs["clip_template_s0"].data == "incaps" and runs["clip_template_s0"].data_root == paper_env["INCAPS_ROOT"]
    assert runs["clip_template_s0"].val_root == paper_env["IMAGENET_VAL"]
    assert runs["clip_laionet_s0"].train_file == paper_env["LAIONET_TSV"]
    assert runs["clip_frozen_frac1_s0"].text_init == "RN50:openai" and runs["clip_frozen_frac1_s0"].lock_text
    assert runs["sl-frozen_tail0_s0"].head_file == "clip-rn50"
    assert runs["dino_vanilla_s0"].prototypes == 65536 and runs["dino_voc16384_s0"].voc == 16384
    assert runs["dino_small-head_s0"].prototypes == 16384
    assert runs["dino_balanced_s0"].data_root == paper_env["IMAGENET_TRAIN"]
    assert runs["clip_ow300_s0"].open_world == 300 and runs["clip_ow300_s0"].classes == "in100"
    for script, argv, _ in commands[:-1]:  # a flag given twice must be a repeatable one (else the parser keeps the last)
        args = runs[os.path.basename(argv[argv.index("--out") + 1])]
        for flag in {a for a in argv if a.startswith("--") and argv.count(a) > 1}:
            value = getattr(args, flag[2:].replace("-", "_"))
            assert isinstance(value, list) and len(value) == argv.count(flag), f"{script}: {flag} given twice"
    fig1 = runs["fig1_pretrained"]
    assert fig1.eval_only and len(fig1.pretrained) >= 5 and fig1.val_root == paper_env["IMAGENET_VAL"]


def test_paper_without_data_skips_every_section_with_a_message():
    proc = run_all("--dry-run")
    assert [s for s, _, _ in planned_commands(proc.stdout)] == ["report.py"]
    assert "skipped fig3: set INCAPS_ROOT IMAGENET_VAL" in proc.stdout
    assert "skipped fig10: set LAIONET_TSV TRANSFER_ROOT (" in proc.stdout  # DINO needs no ImageNet val


@pytest.mark.parametrize("argv,message", [(["--only", "fig99"], "unknown section"), (["--bogus"], "unknown option"),
                                          (["--seeds", "a b"], "--seeds"), (["--out"], "needs a value"),
                                          (["--jobs", "2"], "one at a time")])
def test_bad_options_fail_in_one_line(argv, message):
    """(also: an interpreter without torch stops run_all.sh before any run, in one line)"""
    proc = run_all(*argv, "--dry-run", check=False) if argv != ["--out"] else run_all("--dry-run", *argv, check=False)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1


def test_an_interpreter_without_torch_stops_before_any_run(tmp_path):
    proc = run_all("--smoke", "--out", str(tmp_path / "runs"), env={"PYTHON": "/bin/false"}, check=False)
    assert proc.returncode == 2 and "cannot import torch" in proc.stderr and not (tmp_path / "runs").exists()


# ---- The executor, with a stand-in interpreter that records its calls --------------------------------

FAKE_PYTHON = r"""#!/usr/bin/env bash
# stands in for python: records the call, writes what the scripts would, fails where FAIL_MATCH says
[[ $1 == -c ]] && exit 0  # run_all.sh's check that the environment has torch & co
echo "$*" >> "$CALLS"
script=$1; shift
[[ $script == report.py ]] && exit 0
out="" head=""
while (($#)); do
    case $1 in --out) out=$2; shift ;; --export-head) head=$2; shift ;; esac
    shift
done
if [[ -n ${FAIL_MATCH:-} && $out == *"$FAIL_MATCH"* ]]; then echo "boom in $out" >&2; exit 3; fi
mkdir -p "$out"
echo '{"top1": 0.5}' > "$out/final.json"
echo "${OMP_NUM_THREADS:-unset}" > "$out/threads"
[[ -n $head ]] && touch "$head"
exit 0
"""


@pytest.fixture
def fake_python(tmp_path):
    path = tmp_path / "fake_python"
    path.write_text(FAKE_PYTHON)
    path.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    return dict(PYTHON=str(path), CALLS=str(calls))


def calls_of(env):
    with open(env["CALLS"]) as f:
        return [line.split() for line in f.read().splitlines()]


def test_executor_runs_skips_and_resumes(tmp_path, fake_python):
    out = str(tmp_path / "runs")
    args = ("--smoke", "--only", "fig8", "--out", out, "--report", str(tmp_path / "report"))
    proc = run_all(*args, env=fake_python)
    calls = calls_of(fake_python)
    assert len(calls) == 10 and calls[-1][0] == "report.py"  # 9 runs of Fig. 8/9, then the report
    # --smoke runs two at a time: the first two processes start together and log their calls in either order
    first_two = {(c[0], os.path.basename(c[c.index("--out") + 1])) for c in calls[:2]}
    assert ("clip_tail.py", "clip_textpre_s0") in first_two, first_two
    assert "[1/9] clip_textpre_s0 ... ok" in proc.stdout and "[9/9]" in proc.stdout
    with open(os.path.join(out, "logs", "sl_tail0_s0.log")) as f:
        log = f.read()
    assert log.startswith("+ ") and "cpu (user, system):" in log
    with open(os.path.join(out, "sl_tail0_s0", "threads")) as f:
        assert f.read().strip() == "1"  # --smoke: single-threaded runs, two at a time

    # re-run: finished runs are skipped; a run with a checkpoint but no final.json is resumed
    os.remove(os.path.join(out, "sl_tail1_s0", "final.json"))
    open(os.path.join(out, "sl_tail1_s0", "checkpoint.pt"), "w").close()
    proc = run_all(*args, env=fake_python)
    new = calls_of(fake_python)[10:]
    assert [c[0] for c in new] == ["sl_tail.py", "report.py"]
    assert new[0][-1] == "--resume" and "sl_tail1_s0" in new[0][new[0].index("--out") + 1]
    assert proc.stdout.count("done earlier") == 8
    assert "run_all.sh: 1 runs (and 8 finished earlier) in " in proc.stdout
    assert "run_all.sh --smoke: 1 runs (and 8 finished earlier) (2 at a time) in " in " ".join(new[-1])  # report note


def test_an_unfinished_folder_under_a_shared_name_gives_way_to_the_link(tmp_path, fake_python):
    """clip_ow0 (Fig. 6) is the same command as clip_title-desc-tags (Fig. 3): a full plan links it. A
    folder left there by an interrupted `--only fig6` must not hide the shared result."""
    out = tmp_path / "runs"
    (out / "clip_ow0_s0").mkdir(parents=True)
    (out / "clip_ow0_s0" / "checkpoint.pt").write_text("")
    (out / "clip_ow100_s0").mkdir()  # a finished folder under a name of its own stays as it is
    (out / "clip_ow100_s0" / "final.json").write_text('{"top1": 0.25}')
    run_all("--smoke", "--only", "fig3,fig6", "--out", str(out), "--report", str(tmp_path / "r"), env=fake_python)
    assert (out / "clip_ow0_s0").is_symlink() and os.readlink(out / "clip_ow0_s0") == "clip_title-desc-tags_s0"
    assert (out / "clip_ow0_s0" / "final.json").is_file()
    assert json.loads((out / "clip_ow100_s0" / "final.json").read_text()) == {"top1": 0.25}


def test_a_failure_is_reported_at_the_end_and_does_not_stop_the_others(tmp_path, fake_python):
    env = dict(fake_python, FAIL_MATCH="clip_textpre")
    out = str(tmp_path / "runs")
    proc = run_all("--smoke", "--only", "fig8", "--out", out, "--report", str(tmp_path / "r"), env=env, check=False)
    assert proc.returncode == 1
    assert "[1/9] clip_textpre_s0 ... FAILED (exit 3)" in proc.stdout and "boom" in proc.stdout
    # the runs that need the pre-trained text tower (CLIP's frozen tower, SL's frozen prototypes) fail without
    # starting; the two SL runs with learned prototypes still run
    scripts_run = [c for c in calls_of(env) if c[0] != "report.py"]
    assert len(scripts_run) == 3 and sum(c[0] == "sl_tail.py" for c in scripts_run) == 2
    assert os.path.isfile(os.path.join(out, "sl_tail0_s0", "final.json"))
    summary = proc.stdout[proc.stdout.index("failed:"):]
    assert "clip_textpre_s0 (exit 3" in summary and "clip-frozen_tail0_s0 (needs" in summary
    assert "sl-frozen-voc_tail0_s0 (needs" in summary
    assert summary.count("\n  ") == 7  # the failure + the 6 runs that needed its output


# ---- The whole pipeline at --smoke size --------------------------------------------------------------

@pytest.mark.slow
def test_smoke_pipeline_end_to_end(tmp_path):
    """bash run_all.sh --smoke: every script for real (tiny world, one epoch each), then the report."""
    import report
    out, rep = tmp_path / "runs", tmp_path / "report"
    env = {"CLIP_BEYOND_TAIL_CACHE": str(tmp_path / "cache")}
    proc = run_all("--smoke", "--out", str(out), "--report", str(rep), env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]
    planned = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert planned and all(line.endswith("s") and " ok " in line for line in planned), planned
    for name in report.FIGURES:
        assert (rep / name).is_file(), name
    text = (rep / "REPORT.md").read_text()
    for section in report.SECTIONS:
        assert f"## {section}\n" in text
    # every run of the plan finished, and the shared ones are linked
    for line in planned:
        name = line.split()[1]
        with open(out / name / "final.json") as f:
            assert "top1" in json.load(f) or name.startswith("dino")
    assert (out / "clip_ow0_s0" / "final.json").is_file()
    # nothing of the plan is missing in the report's run table
    assert "| `sl_voc0` | 0 | missing" not in text
