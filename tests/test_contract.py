"""The CLI contract under bad input (issue 16): one line on stderr naming the problem and the fix, exit 2,
no traceback; --json prints exactly one object whatever happens; nothing a user gave is silently ignored."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from bigmodel.config import load_config
from bigmodel.errors import UserError
from tests.conftest import CONFIGS, cli, tiny_digits, write_config

DIGITS = {"data": {"path": str(CONFIGS / "data" / "digits.csv.gz"), "target": "label"}}


def refused(result: object, *fragments: str) -> str:
    """The result is a user error: exit 2, ending with one 'error:' line (progress lines of stages that ran
    before may precede it), no traceback, naming every fragment."""
    assert result.code == 2, (result.code, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


# ---- config: tagged unions, finite numbers, who gave the bad value


@pytest.mark.parametrize(
    "section, typo, expected",
    [
        ({"train": {"augment": [{"kind": "mixup", "alphaa": 0.2}]}}, "train.augment.0.alphaa", "alpha"),
        ({"train": {"augment": [{"kind": "noise", "stdd": 0.1}]}}, "train.augment.0.stdd", "std"),
        ({"train": {"augment": [{"kind": "feature_dropout", "pp": 0.1}]}}, "train.augment.0.pp", "p"),
        ({"compress": {"steps": [{"method": "quantize", "modee": "dynamic"}]}}, "compress.steps.0.modee", "mode"),
        ({"compress": {"steps": [{"method": "prune", "sparsityy": 0.5}]}}, "compress.steps.0.sparsityy", "sparsity"),
        ({"compress": {"steps": [{"method": "distill", "stepss": 5}]}}, "compress.steps.0.stepss", "steps"),
        ({"model": {"family": "mlp", "hidden_sizez": [8]}}, "model.hidden_sizez", "hidden_sizes"),
        (
            {"model": {"family": "gpt", "n_layerr": 1}, "data": {"format": "text", "path": "x.txt"}},
            "model.n_layerr",
            "n_layer",
        ),
        ({"data": {"format": "text", "path": "x.txt", "jsonl_feld": "t"}}, "data.jsonl_feld", "jsonl_field"),
        (
            {"data": {"format": "sft", "path": "x.jsonl", "train_onn": "all"}, "init": {"from": "m.gguf"}},
            "data.train_onn",
            "train_on",
        ),
    ],
)
def test_every_tagged_section_suggests_the_key_meant(tmp_path: Path, section: dict, typo: str, expected: str) -> None:
    raw = {**DIGITS, **section}
    if "data" in section:
        raw["data"] = section["data"]
    with pytest.raises(UserError) as caught:
        load_config(write_config(tmp_path / "c.yaml", raw))
    message = str(caught.value)
    assert f"{typo}: unknown key (did you mean '{expected}'?); allowed here: " in message
    allowed = message.split(f"{typo}: unknown key")[1].split("allowed here: ")[1].split(";")[0]
    assert expected in allowed.split(", ")


def test_infinite_and_nan_numbers_are_refused_everywhere(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", DIGITS)
    for override in ("train.lr=.inf", "train.grad_clip=.nan", "eval.fail_under.accuracy=-.inf"):
        line = refused(cli("config", "show", "-c", config, "--set", override), f"--set {override}", "finite")
        assert str(config) not in line  # the --set gave the value, not the file


def test_problems_are_blamed_on_their_source(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", {**DIGITS, "extends": "missing_base.yaml"})
    refused(cli("config", "show", "-c", config), f"{config}: extends 'missing_base.yaml'", "file not found")
    config = write_config(tmp_path / "d.yaml", {**DIGITS, "train": {"lr": 0.01}})
    line = refused(cli("config", "show", "-c", config, "--set", "train.min_lr=0.5"), "--set train.min_lr=0.5")
    assert "must not exceed train.lr" in line and str(config) not in line


def test_empty_run_dir_is_refused_not_taken_as_here(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", DIGITS)
    refused(cli("prepare", "-c", config, "--run-dir", ""), "--run-dir is empty")
    refused(cli("prepare", "-c", config, "--set", "run_dir=''"), "run_dir: is empty")
    assert not list(Path.cwd().glob("prepare"))


def test_derived_configs_are_validated(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path / "c.yaml", DIGITS))
    assert config.derive("test", train={"lr": 0.5}).train.lr == 0.5
    with pytest.raises(UserError, match="test: .*train.min_lr"):
        config.derive("test", train={"lr": 1e-5, "min_lr": 1e-4})


def test_distillation_lr_never_rises_above_its_own_lr(digits_run: Path, tmp_path: Path) -> None:
    config = tiny_digits(tmp_path, lr=0.01, min_lr=1e-4)
    shutil.copytree(digits_run.parent / "run", tmp_path / "run")
    result = cli(
        "compress",
        "-c",
        config,
        "-q",
        "--set",
        "compress.steps=[{method: distill, student: {hidden_sizes: [8]}, steps: 20, lr: 1.0e-5}]",
    )
    assert result.code == 0, result.stderr
    lrs = [
        json.loads(line)["lr"]
        for line in (tmp_path / "run" / "compress" / "step1" / "metrics.jsonl").read_text().splitlines()
        if "lr" in json.loads(line)
    ]
    assert lrs and max(lrs) <= 1e-5 and min(lrs) < 1e-5


# ---- usage errors and --json


def test_usage_errors_are_one_line_and_one_json_object() -> None:
    result = cli("train", "--json")
    refused(result, "give -c CONFIG", "or --run-dir DIR")
    payload = json.loads(result.stdout)  # exactly one object
    assert payload["ok"] is False and payload["exit_code"] == 2 and not payload["error"].startswith("error")
    result = cli("train", "-c", "--json")  # -c swallowed the flag: a usage error
    refused(cli("inspect", "--json"), "missing argument 'path'", "bigmodel inspect --help")
    result = cli("eval", "-c", "x.yaml", "--bogus", "--json")
    refused(result, "no such option: --bogus")
    assert json.loads(result.stdout)["command"] == "eval"
    refused(cli("trian"), "no such command 'trian'", "train")


def test_json_error_field_does_not_repeat_the_prefix(tmp_path: Path) -> None:
    result = cli("prepare", "-c", tmp_path / "missing.yaml", "--json")
    refused(result, "config file not found")
    assert json.loads(result.stdout)["error"].startswith("config file not found")


# ---- file system


def test_unusable_run_dirs_are_user_errors(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", DIGITS)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    refused(cli("prepare", "-c", config, "--run-dir", blocker), str(blocker), "another --run-dir")
    stage_file = tmp_path / "run2"
    stage_file.mkdir()
    (stage_file / "prepare").write_text("x")
    refused(cli("prepare", "-c", config, "--run-dir", stage_file), str(stage_file / "prepare"))
    assert (stage_file / "prepare").read_text() == "x"  # the file in the way is left as it was
    if Path("/sys").is_dir() and not os.access("/sys", os.W_OK):
        refused(cli("prepare", "-c", config, "--run-dir", "/sys/bigmodel-run"), "/sys/bigmodel-run")


# ---- text data


def text_config(tmp_path: Path, text: bytes, **data: object) -> Path:
    source = tmp_path / "corpus.txt"
    source.write_bytes(text)
    return write_config(
        tmp_path / "t.yaml", {"run_dir": "run", "data": {"format": "text", "path": str(source), **data}}
    )


def test_text_that_is_not_utf8_names_the_file_the_byte_and_the_key(tmp_path: Path) -> None:
    latin = "caf\u00e9 au lait, cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 50
    refused(cli("prepare", "-c", text_config(tmp_path, latin)), "corpus.txt", "not utf-8", "offset 3", "data.encoding")
    assert cli("prepare", "-c", text_config(tmp_path, latin, encoding="latin-1"), "-q").code == 0
    refused(cli("prepare", "-c", text_config(tmp_path, b"\x00\x01\xff\xfe" * 100)), "binary file")
    refused(cli("config", "show", "-c", text_config(tmp_path, b"x", encoding="utf-9")), "unknown text encoding")


def test_degenerate_corpora_are_refused_with_what_is_wrong(tmp_path: Path) -> None:
    refused(cli("prepare", "-c", text_config(tmp_path, b"")), "no text", "empty")
    refused(cli("prepare", "-c", text_config(tmp_path, b"a" * 5000 + b"\n")), "1 distinct character", "'a'")
    assert not (tmp_path / "run" / "prepare" / "manifest.json").exists()  # nothing half-prepared is left


# ---- nothing lost: unfinished runs, leftovers, changed settings, content-checked skips


def train_manifest(config: Path, name: str = "last") -> dict:
    """A training checkpoint's manifest, as the JSON it stores."""
    from bigmodel.runs import checkpoint_manifest

    manifest = checkpoint_manifest(config.parent / "run" / "train" / f"{name}.safetensors")
    assert manifest is not None
    return manifest.model_dump(mode="json", by_alias=True)


def test_an_unfinished_run_is_never_thrown_away_silently(fresh_run: Path) -> None:
    assert cli("train", "-c", fresh_run, "--until-step", "20", "-q").code == 0
    assert train_manifest(fresh_run)["resume"]["loop"]["finished"] is False
    for command in (["train"], ["pipeline"]):
        line = refused(cli(*command, "-c", fresh_run), "unfinished run (step 20 of 80)", "--resume", "--restart")
    assert train_manifest(fresh_run)["step"] == 20  # untouched by the refusals
    resumed = cli("pipeline", "-c", fresh_run, "--resume", "--to", "eval", "--json", "-q")
    assert resumed.code == 0, resumed.stderr
    assert resumed.json()["stages"]["train"]["steps"] == 80 and resumed.json()["stages"]["train"]["finished"]
    steps = [
        json.loads(line)["step"]
        for line in (fresh_run.parent / "run" / "train" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == sorted(steps) and steps[-1] == 80
    assert line  # the message of the refusals was checked above
    refused(cli("train", "-c", fresh_run, "--resume", "--restart"), "contradict")


def test_a_new_run_replaces_every_artifact_of_the_old_one(fresh_run: Path) -> None:
    train_dir = fresh_run.parent / "run" / "train"
    result = cli(
        "train", "-c", fresh_run, "--set", "train.max_steps=400", "--set", "train.eval_every=100", "--until-step", "20"
    )
    assert result.code == 0, result.stderr
    assert "replacing the finished run" in result.stderr and "no evaluation yet" in result.stderr
    assert "inf" not in result.stderr and "None" not in result.stderr
    assert not (train_dir / "best.safetensors").exists()  # the old run's best is gone, not kept
    assert not (train_dir / "metrics.jsonl").exists()  # the old run's log is gone (tabular logs at evaluations)
    refused(
        cli(
            "pipeline", "-c", fresh_run, "--set", "train.max_steps=400", "--set", "train.eval_every=100", "--to", "eval"
        ),
        "unfinished run",
    )


def test_resume_with_changed_settings_is_refused_unless_allowed(fresh_run: Path) -> None:
    assert cli("train", "-c", fresh_run, "--until-step", "20", "--restart", "-q").code == 0
    refused(
        cli("train", "-c", fresh_run, "--resume", "--set", "train.lr=0.02", "--set", "train.batch_size=32"),
        "config changed",
        "train.lr (0.01 -> 0.02)",
        "train.batch_size (64 -> 32)",
        "--allow-changes",
    )
    assert (
        cli("train", "-c", fresh_run, "--resume", "--until-step", "40", "--set", "train.tensorboard=true", "-q").code
        == 0
    )  # logging settings change nothing the run computes
    # a key this family's recipe never reads is refused, not silently ignored
    refused(
        cli("train", "-c", fresh_run, "--resume", "--set", "train.log_every=7"),
        "train.log_every is not read when training model.family 'mlp'",
    )
    allowed = cli("train", "-c", fresh_run, "--resume", "--allow-changes", "--set", "train.lr=0.02", "-q")
    assert allowed.code == 0, allowed.stderr
    record = train_manifest(fresh_run)["resumed_with_changes"]
    assert record == [{"step": 40, "changes": {"train.lr": [0.01, 0.02]}}]


def test_up_to_date_means_the_same_content_not_the_same_times(tmp_path: Path) -> None:
    data = tmp_path / "digits.csv"
    import gzip

    data.write_bytes(gzip.decompress((CONFIGS / "data" / "digits.csv.gz").read_bytes()))
    config = write_config(
        tmp_path / "c.yaml", {"run_dir": "run", "threads": 1, "data": {"path": str(data), "target": "label"}}
    )
    assert cli("prepare", "-c", config, "-q").code == 0
    skipped = lambda: "prepare is up to date" in cli("pipeline", "-c", config, "--to", "prepare").stderr  # noqa: E731
    os.utime(data, None)  # touched: same content, newer time
    assert skipped()
    info = data.stat()
    raw = bytearray(data.read_bytes())
    raw[-2] = ord("1") if raw[-2] != ord("1") else ord("2")  # one label changed, same size
    data.write_bytes(bytes(raw))
    os.utime(data, ns=(info.st_atime_ns, info.st_mtime_ns))  # and its modification time set back
    assert not skipped()
    assert skipped() and "prepare is up to date" in cli("pipeline", "-c", config, "--to", "prepare", "--verify").stderr


def test_eval_of_another_artifact_never_overwrites_the_runs_result(fresh_run: Path) -> None:
    eval_dir = fresh_run.parent / "run" / "eval"
    main = (eval_dir / "metrics.json").read_text()
    assert cli("eval", "-c", fresh_run, "--checkpoint", "last", "-q").code == 0
    onnx = fresh_run.parent / "run" / "export" / "model.onnx"
    assert cli("eval", "-c", fresh_run, "--set", f"eval.checkpoint={onnx}", "-q").code == 0
    assert cli("eval", "-c", fresh_run, "--checkpoint", "init", "-o", fresh_run.parent / "mine.json", "-q").code == 0
    assert (eval_dir / "metrics.json").read_text() == main
    assert json.loads((eval_dir / "metrics.last.json").read_text())["checkpoint"].endswith("last.safetensors")
    assert json.loads((eval_dir / "metrics.model.json").read_text())["checkpoint"] == str(onnx)
    assert json.loads((fresh_run.parent / "mine.json").read_text())["step"] == 0
    refused(
        cli(
            "compress",
            "-c",
            fresh_run,
            "--set",
            f"compress.checkpoint={onnx}",
            "--set",
            "compress.steps=[{method: quantize}]",
        ),
        "starts from a checkpoint (.safetensors), not an ONNX model",
    )


def test_ctrl_c_says_where_the_last_checkpoint_is_and_how_to_resume(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    config = tiny_digits(tmp_path, epochs=4000, eval_every=500, save_every=100)
    assert cli("pipeline", "-c", config, "--to", "init", "-q").code == 0

    # A shell starts commands with Ctrl-C at its default action and unblocked; an ignored or blocked
    # SIGINT would be inherited from this process if anything in it had left the signal so.
    def as_a_shell_does() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    proc = subprocess.Popen(
        [sys.executable, "-m", "bigmodel", "train", "-c", str(config), "-q"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        preexec_fn=as_a_shell_does,
    )
    last = tmp_path / "run" / "train" / "last.safetensors"
    deadline = time.time() + 120
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    line = stderr.strip().splitlines()[-1]
    step = train_manifest(config)["step"]
    assert f"its last checkpoint is step {step} ({last})" in line
    assert line.endswith(f"resume with: bigmodel train -c {config} -q --resume")


# ---- the run record


def test_a_run_directory_alone_is_enough(fresh_run: Path) -> None:
    run_dir = fresh_run.parent / "run"
    assert cli("pipeline", "-c", fresh_run, "--to", "eval", "-q").code == 0  # writes run/config.yaml
    assert (run_dir / "config.yaml").is_file()
    assert cli("config", "show", "--run-dir", run_dir).stdout == cli("config", "show", "-c", fresh_run).stdout
    evaluated = cli("eval", "--run-dir", run_dir, "--json", "-q")
    assert evaluated.code == 0 and evaluated.json()["accuracy"] > 0.8
    reported = cli("report", "--run-dir", run_dir, "--json", "-q")
    assert reported.code == 0 and Path(reported.json()["report"]).is_file()
    shown = cli("inspect", run_dir, "--json").json()
    assert shown["kind"] == "run" and shown["stages"]["train"]["status"] == "done"
    assert shown["stages"]["train"]["config"] == "as config.yaml" and shown["stages"]["compress"]["status"] == "not run"
    human = cli("inspect", run_dir).stdout
    assert "None" not in human and "True" not in human and "train" in human
    refused(cli("eval", "--run-dir", fresh_run.parent), "has no config.yaml", "-c CONFIG")


def test_runs_lists_and_compares(fresh_run: Path) -> None:
    other = fresh_run.parent / "other"
    shutil.copytree(fresh_run.parent / "run", other)
    assert cli("pipeline", "-c", fresh_run, "--to", "eval", "-q").code == 0
    assert (
        cli("pipeline", "-c", fresh_run, "--run-dir", other, "--set", "train.lr=0.02", "--to", "eval", "-q").code == 0
    )
    listed = cli("runs", fresh_run.parent, "--json").json()["runs"]
    assert sorted(Path(r["path"]).name for r in listed) == ["other", "run"]
    assert all(r["family"] == "mlp" and r["step"] == 80 and "accuracy" in r["metric"] for r in listed)
    compared = cli("runs", "--compare", fresh_run.parent / "run", other, "--json").json()
    assert compared["config_differences"] == {"train.lr": [0.01, 0.02]}
    assert len(compared["metrics"]["eval.accuracy"]) == 2
    table = cli("runs", fresh_run.parent).stdout
    assert table.splitlines()[0].split() == ["run", "family", "last", "stage", "step", "metric", "when"]
    assert cli("eval", "-c", fresh_run, "-q").code == 0  # run last, though export comes after it in a pipeline
    listed = {Path(r["path"]).name: r for r in cli("runs", fresh_run.parent, "--json").json()["runs"]}
    assert listed["run"]["last_stage"].startswith("eval ("), listed["run"]


def test_inspect_says_what_any_project_file_is(fresh_run: Path, tmp_path: Path) -> None:
    run_dir = fresh_run.parent / "run"
    kinds = {
        run_dir / "train" / "metrics.jsonl": "training log",
        run_dir / "prepare" / "data.safetensors": "prepared tabular data",
        run_dir / "prepare" / ".stamp.json": "stage stamp",
        run_dir / "export" / "parity.json": "export parity report",
        run_dir / "infer" / "predictions.csv": "csv",
        # a stage's folder is shown by the file that says what the stage made
        run_dir / "eval": "eval metrics",
        run_dir / "infer": "csv",
        run_dir / "prepare": "tabular-data",
    }
    for path, kind in kinds.items():
        result = cli("inspect", path, "--json")
        assert result.code == 0 and result.json()["kind"].startswith(kind), (path, result.stderr)
    stray = tmp_path / "notes.txt"
    stray.write_text("hello")
    refused(cli("inspect", stray), "not a file bigmodel writes")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 20)
    line = refused(cli("inspect", broken), "not a readable safetensors file")
    assert "Error" not in line


# ---- help and completion


def test_each_command_help_lists_its_keys_one_per_line_with_type_and_default() -> None:
    expected = {
        "prepare": ["data.path", "data.encoding", "data.tokenizer.kind", "data.cleaning.dedupe"],
        "init": ["model.n_layer", "model.hidden_sizes", "init.scheme"],
        "train": ["train.lr", "train.lora.rank", "train.augment[].kind"],
        "infer": ["infer.top_k"],
        "eval": ["eval.output"],
        "compress": ["compress.steps[].method"],
    }
    for command, keys in expected.items():
        text = cli(command, "--help").stdout
        lines = text.splitlines()
        for key in [*keys, "seed", "threads", "device", "run_dir"]:
            line = next((entry for entry in lines if entry.strip().startswith(f"{key}  (")), None)
            assert line is not None, (command, key)
            assert ", default " in line or ", required)" in line, line
    lr = next(line for line in cli("train", "--help").stdout.splitlines() if "train.lr  (" in line)
    assert lr.split() == ["train.lr", "(float,", "default", "0.001)"]


def test_shell_completion_knows_stages_and_config_keys() -> None:
    import subprocess
    import sys

    def complete(words: str) -> list[str]:
        env = {
            **os.environ,
            "_BIGMODEL_COMPLETE": "complete_bash",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - 1),
        }
        script = Path(sys.executable).with_name("bigmodel")  # the console script: completion is by program name
        proc = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and not proc.stderr, proc.stderr
        return proc.stdout.split()

    assert complete("bigmodel pipeline --to ev") == ["eval"]
    assert complete("bigmodel pipeline --from ex") == ["export"]
    assert "train.lr=" in complete("bigmodel train --set train.l") and "data.encoding=" in complete(
        "bigmodel prepare --set data.en"
    )


def test_processes_times_threads_fit_the_cores() -> None:
    from bigmodel.train.launch import threads_per_process

    cores = len(os.sched_getaffinity(0))
    assert threads_per_process(cores, 2, []) == ([] if cores // 2 == cores else [f"threads={max(1, cores // 2)}"])
    assert threads_per_process(None, cores * 2, []) == ["threads=1"]
    assert threads_per_process(1, 2, []) == []  # the config's fits: kept
    assert threads_per_process(8, 2, ["threads=8"]) == []  # said on the command line: the user's word


# ---- the family contract


def _parameters(function: object) -> list[tuple[str, object, bool]]:
    """(name, kind, has a default) of each parameter but self."""
    import inspect

    return [
        (p.name, p.kind, p.default is not inspect.Parameter.empty)
        for p in inspect.signature(function).parameters.values()
        if p.name != "self"
    ]  # type: ignore[arg-type]


@pytest.mark.parametrize("role", ["model", "recipe", "evaluator", "exporter", "inferer", "server", "explainer"])
def test_every_familys_modules_play_their_roles_as_the_protocols_say(role: str) -> None:
    """Each family's module for a role has every member of the role's Protocol (bigmodel/roles.py), with
    the same parameter names, kinds and defaults: any stage can call any family's module the same way."""
    import inspect

    from bigmodel.families import FAMILIES
    from bigmodel.roles import ROLES, Engine

    protocol = ROLES[role]
    members = [name for name, value in vars(protocol).items() if inspect.isfunction(value) and not name.startswith("_")]
    assert members, role
    for family in FAMILIES.values():
        module = family.module(role)
        for name in members:
            assert hasattr(module, name), f"{family.name}'s {role} ({getattr(family, role)}) lacks {name}"
            assert _parameters(getattr(module, name)) == _parameters(getattr(protocol, name)), (family.name, name)
        if role == "server":  # and the engine it builds has the Engine protocol's members
            engine = module.Engine
            for name, value in vars(Engine).items():
                if inspect.isfunction(value) and not name.startswith("_"):
                    assert _parameters(getattr(engine, name)) == _parameters(value), (family.name, name)
            assert isinstance(engine.kind, str)


def test_every_familys_network_names_its_neurons_for_structured_pruning() -> None:
    """compress's structured pruning asks the network for its neuron groups (roles.StructurallyPrunable),
    never for a family's layer names; every group names modules the network has."""
    import torch

    from bigmodel import registry
    from bigmodel.arch import DecoderArch, EncoderArch, TabularArch
    from bigmodel.roles import StructurallyPrunable

    for arch in (
        DecoderArch(vocab_size=20, n_layer=2, n_head=2, n_embd=8, block_size=8, mlp="swiglu"),
        EncoderArch(task="mlm", vocab_size=20, n_layer=2, n_head=2, n_embd=8, block_size=8),
        TabularArch(task="classification", n_inputs=3, n_outputs=2, hidden_sizes=(4, 5)),
    ):
        with torch.device("meta"):
            model = registry.build_model(arch)
        assert isinstance(model, StructurallyPrunable), arch.family
        modules = dict(model.named_modules())
        groups = model.neuron_groups()
        assert len(groups) == 2 and all(name in modules for makers, reader in groups for name in [*makers, reader])


def test_every_compress_step_has_the_one_step_signature() -> None:
    """prune, distill and quantize are each the current artifact in, the next out (compress.Step), so the
    stage is one loop over them."""
    import inspect

    from bigmodel.compress import Step, distill, prune, quantize

    for module in (prune, distill, quantize):
        for name, member in vars(Step).items():
            if inspect.isfunction(member) and not name.startswith("_"):
                assert _parameters(getattr(module, name)) == _parameters(member), (module.__name__, name)


def test_the_adding_a_family_checklist_names_every_family_field() -> None:
    """docs/developer.md's checklist for a new family stays true: every field of the family table's entry
    is named in it (a field added without a line there fails here)."""
    from dataclasses import fields

    from bigmodel.families import Family

    page = (Path(__file__).parent.parent / "docs" / "developer.md").read_text()
    checklist = page.split("## Adding a family", 1)[1].split("\n## ", 1)[0]
    missing = [f.name for f in fields(Family) if f"`{f.name}`" not in checklist]
    assert not missing, f"docs/developer.md's 'Adding a family' does not name {missing}"
