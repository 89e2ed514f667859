"""The `medistill` command line: the only place that talks to the user.

Exit codes: 0 success, 2 usage error (bad flag, value, path or config), 1 any other failure.
Errors are one line on stderr; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import textwrap
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from medistill import __version__
from medistill.errors import MedistillError, UsageError

log = logging.getLogger("medistill.cli")

Handler = Callable[[argparse.Namespace], int]


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _add_command(subparsers: Any, name: str, help_text: str, examples: Sequence[str], handler: Handler,
                 common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        name, help=help_text, description=help_text, epilog=_examples(*examples), parents=[common],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(handler=handler)
    return parser


# ----------------------------------------------------------------------------------------------
# data


def _knob_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per field of PhantomKnobs, so new knobs reach the CLI without edits here."""
    from medistill.data.phantom import PhantomKnobs

    hints = typing.get_type_hints(PhantomKnobs)
    group = parser.add_argument_group("phantom knobs (docs/phantom.md)")
    for knob in dataclasses.fields(PhantomKnobs):
        kind = hints[knob.name]
        flag = "--" + knob.name.replace("_", "-")
        help_text = f"{knob.metadata.get('help', '')} (default {knob.default})"
        if kind is bool:
            group.add_argument(flag, dest=f"knob_{knob.name}", action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f"knob_{knob.name}", type=kind, default=None, metavar=kind.__name__.upper(),
                               help=help_text)


def cmd_make_phantom(args: argparse.Namespace) -> int:
    from medistill.data.phantom import MODALITIES, PhantomKnobs, write_phantom

    chosen = {key[len("knob_"):]: value for key, value in vars(args).items()
              if key.startswith("knob_") and value is not None}
    try:
        knobs = PhantomKnobs(**chosen)
    except (TypeError, ValueError) as error:
        raise UsageError(f"bad phantom knob: {error}") from None
    summary = write_phantom(args.out, cases=args.cases, seed=args.seed,
                            modalities=args.modalities or MODALITIES, knobs=knobs,
                            progress=sys.stderr.isatty(), overwrite=args.overwrite)
    print(f"phantom world written to {args.out}")
    print(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from medistill.data.checks import check_dataset, format_check_report

    report = check_dataset(args.format, args.path, on_error=args.on_error)
    print(json.dumps(report, indent=2, sort_keys=True, default=str) if args.json else format_check_report(report))
    if args.strict and report.get("problem_count", len(report["problems"])):
        return 1
    return 0


def _add_data(subparsers: Any, common: argparse.ArgumentParser) -> None:
    data = subparsers.add_parser("data", help="make the phantom world; check a dataset",
                                 description="Data tools: generate the phantom world, check a dataset.",
                                 parents=[common])
    inner = data.add_subparsers(dest="data_command", metavar="{make-phantom,check}", required=True)
    phantom = _add_command(
        inner, "make-phantom", "generate the synthetic phantom world (images, masks, reports, tables, VQA, grounding)",
        ["medistill data make-phantom --out runs/phantom --cases 200 --seed 0",
         "medistill data make-phantom --out runs/faint --cases 50 --modalities cxr mammo --subtlety 0.5"],
        cmd_make_phantom, common)
    phantom.add_argument("--out", required=True, type=Path, help="output folder (must not exist or be empty)")
    phantom.add_argument("--cases", required=True, type=int, help="cases per modality")
    phantom.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives byte-identical files")
    phantom.add_argument("--modalities", nargs="+", help="subset of modalities (default: all)")
    phantom.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _knob_flags(phantom)
    check = _add_command(
        inner, "check", "count, validate and look for leakage in a dataset in its published layout",
        ["medistill data check --format vqa-rad ../shared/data/vqa_rad",
         "medistill data check --format mini-mias ../shared/data/mini_mias --json --strict"],
        cmd_data_check, common)
    check.add_argument("path", type=Path, help="the dataset's root folder")
    check.add_argument("--format", required=True, help="dataset format, e.g. vqa-rad, mini-mias, nih-cxr, phantom")
    check.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    check.add_argument("--strict", action="store_true", help="exit with status 1 on any problem")
    check.add_argument("--on-error", choices=("raise", "skip"), default="skip",
                       help="stop at the first malformed record, or skip and list them all (default)")


# ----------------------------------------------------------------------------------------------
# train, eval, report


def _run_method(config: Any, out: Path, resume: bool) -> dict[str, Any]:
    from medistill.engine import distributed
    from medistill.engine.rundir import RunDir, prepare_output_dir
    from medistill.engine.trainer import resolve_device
    from medistill.methods import RUNNERS

    runner = RUNNERS.get(config.method)
    if runner is None:
        raise UsageError(f"method {config.method!r} has no trainer yet (trainable: {', '.join(sorted(RUNNERS))})")
    distributed.setup(resolve_device(config.train.device).type)  # under torchrun: join the process group
    try:
        prepare_output_dir(out, resume=resume)
        run = RunDir(out)
        if not resume:
            run.write_config(config)
        return runner(config, run, resume)
    finally:
        distributed.teardown()


def _speaks() -> bool:
    """Only the first process of a torchrun launch talks to the user."""
    from medistill.engine.distributed import launch_rank

    return launch_rank() == 0


def cmd_train(args: argparse.Namespace) -> int:
    from medistill.config import load_config

    if args.resume:
        if args.config or args.set:
            raise UsageError("--resume continues a run with its saved config: drop --config and --set")
        out = args.resume
        config = load_config(out / "config.yaml")
    else:
        if not args.config or not args.out:
            raise UsageError("train needs --config FILE and --out DIR (or --resume DIR)")
        out = args.out
        config = load_config(args.config, args.set)
    _run_method(config, out, bool(args.resume))
    if not _speaks():
        return 0
    print(f"run finished: {out}")
    print(f"  metrics: {out / 'metrics.json'}")
    if (out / "report.html").is_file():
        print(f"  report:  {out / 'report.html'}")
    return 0


EXPERIMENTS = ("mmpkd", "amif", "clinkd")


def cmd_experiment(args: argparse.Namespace) -> int:
    from medistill.config import load_config

    config = load_config(args.config, args.set)
    if config.method != args.name:
        raise UsageError(f"{args.config} is a {config.method!r} recipe, not {args.name!r}: "
                         f"pass one of configs/{args.name}/*.yaml")
    if getattr(config, "stage", "experiment") != "experiment":
        raise UsageError(f"the recipe sets stage={config.stage}: run a single stage with 'medistill train', or "
                         "drop the stage setting to run the whole experiment")
    _run_method(config, args.out, False)
    if not _speaks():
        return 0
    print(f"experiment finished: {args.out}")
    print(f"  metrics: {args.out / 'metrics.json'}")
    print(f"  report:  {args.out / 'report.html'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from medistill.methods.evaluate import evaluate_checkpoint

    metrics = evaluate_checkpoint(args.checkpoint, args.config, args.set, split=args.split)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from medistill.report.run import write_run_report

    path = write_run_report(args.run)
    print(f"report written: {path}")
    return 0


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")


def _add_train(subparsers: Any, common: argparse.ArgumentParser) -> None:
    train = _add_command(
        subparsers, "train", "train any recipe into a run directory, or resume one",
        ["medistill train --config configs/demo/classifier.yaml --out runs/cls --set train.epochs=3",
         "medistill train --config configs/clinkd/phantom-tiny.yaml --set stage=sft --out runs/clinkd-sft",
         "medistill train --resume runs/cls"], cmd_train, common)
    train.add_argument("--config", type=Path, help="a YAML recipe under configs/")
    train.add_argument("--out", type=Path, help="the run directory to create")
    _add_overrides(train)
    train.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue a stopped run exactly")

    evaluate = _add_command(
        subparsers, "eval", "evaluate a checkpoint on a split of the data its recipe names (or another)",
        ["medistill eval runs/cls/checkpoints --config runs/cls/config.yaml --split test",
         "medistill eval runs/cls/checkpoints --config runs/cls/config.yaml --set data.root=runs/other"],
        cmd_eval, common)
    evaluate.add_argument("checkpoint", type=Path, help="a checkpoint directory (model.safetensors + config.json)")
    evaluate.add_argument("--config", type=Path, required=True, help="the recipe whose data section to read")
    _add_overrides(evaluate)
    evaluate.add_argument("--split", default="test", choices=("train", "val", "test"))

    experiment = _add_command(
        subparsers, "experiment", "run a method's whole experiment (e.g. teacher, student, distilled student over seeds)",
        ["medistill experiment mmpkd --config configs/mmpkd/phantom-cxr-report.yaml --out runs/mmpkd-cxr",
         "medistill experiment mmpkd --config configs/mmpkd/mini-mias.yaml --out runs/mias --set seeds=[0]",
         "medistill experiment amif --config configs/amif/vqa-rad.yaml --out runs/amif-vqa-rad",
         "medistill experiment amif --config configs/amif/phantom.yaml --out runs/amif-ph --set variants=[full,no_gca]",
         "medistill experiment clinkd --config configs/clinkd/phantom-tiny.yaml --out runs/clinkd-phantom"],
        cmd_experiment, common)
    experiment.add_argument("name", choices=EXPERIMENTS, help="the method")
    experiment.add_argument("--config", type=Path, required=True, help="the method's recipe")
    experiment.add_argument("--out", type=Path, required=True, help="the run directory to create")
    _add_overrides(experiment)

    report = _add_command(subparsers, "report", "write report.html for a finished run directory",
                          ["medistill report runs/cls"], cmd_report, common)
    report.add_argument("run", type=Path, help="a run directory")


# ----------------------------------------------------------------------------------------------
# demo, bench, later commands


def cmd_demo(args: argparse.Namespace) -> int:
    from medistill.demo import run_demo

    result = run_demo(args.out, cases=args.cases, seed=args.seed, epochs=args.epochs)
    print(f"demo finished in {result['seconds']:.0f} s")
    print(f"  report:  {result['report']}")
    print(f"  metrics: {result['metrics']}")
    print("try the trained models on your own images in a browser:")
    for checkpoint in (args.out / "mmpkd-cxr" / "seed0" / "student_kd" / "checkpoints",
                       args.out / "amif-phantom" / "seed0" / "full" / "checkpoints",
                       args.out / "clinkd-phantom" / "student_sft" / "checkpoints"):
        print(f"  medistill serve {checkpoint}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "__main__.py").is_file():
        raise UsageError("the benchmarks live in the repository's bench/ folder: run from a source checkout")
    sys.path.insert(0, str(root))
    from bench.__main__ import main as bench_main  # type: ignore[import-not-found]

    return int(bench_main([*(["--full"] if args.full else []), "--device", args.device]) or 0)


def cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from medistill.errors import DataError
    from medistill.explain.overlay import png_bytes
    from medistill.predict import expand_inputs, load_predictor

    predictor = load_predictor(args.checkpoint)
    images = expand_inputs(args.images)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    failures = 0
    show_bar = len(images) > 1 and sys.stderr.isatty()
    for image in tqdm(images, desc="predict", unit="image", disable=not show_bar):
        try:
            if not image.is_file():
                raise UsageError(f"{image}: no such image file")
            prediction = predictor.predict(image, question=args.question, locate=args.locate)
        except DataError as error:  # an image that cannot be decoded: say so, go on with the others
            failures += 1
            _emit(args.json, {"image": str(image), "error": str(error)}, f"{image}: error: {error}")
            continue
        picture = None
        if args.out and prediction.picture is not None:
            picture = args.out / f"{image.stem}.{prediction.kind}.png"
            picture.write_bytes(png_bytes(prediction.picture))
        record = prediction.as_json() | ({"picture": str(picture)} if picture else {})
        _emit(args.json, record, f"{image}: {prediction.summary()}" + (f"  ({picture})" if picture else ""))
    return 1 if failures else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from medistill.serve import App, make_server

    if args.max_upload_mb <= 0:
        raise UsageError("--max-upload-mb must be positive")
    app = App(args.checkpoint, max_upload=int(args.max_upload_mb * 2**20))
    try:
        server = make_server(app, args.host, args.port)
    except OSError as error:
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({error.strerror}): choose another --port") \
            from None
    host, port = server.server_address[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the model",
              file=sys.stderr)
    print(f"serving the {app.kind} checkpoint {args.checkpoint} at http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def _emit(as_json: bool, record: dict[str, Any], line: str) -> None:
    print(json.dumps(record, sort_keys=True) if as_json else line, flush=True)


def _add_demo_bench(subparsers: Any, common: argparse.ArgumentParser) -> None:
    demo = _add_command(subparsers, "demo", "generate phantom data, run every method at demo scale, write a report",
                        ["medistill demo", "medistill demo --out /tmp/demo --cases 300"], cmd_demo, common)
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    demo.add_argument("--cases", type=int, default=1500, help="phantom cases per modality (default 1500)")
    demo.add_argument("--epochs", type=int, help="training epochs of each demo model (default: the demo recipes')")
    demo.add_argument("--seed", type=int, default=0)
    bench = _add_command(subparsers, "bench", "run the benchmarks in bench/ and write bench/results.json",
                         ["medistill bench", "medistill bench --full", "medistill bench --device cuda"],
                         cmd_bench, common)
    bench.add_argument("--full", action="store_true", help="full sizes instead of quick ones")
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="where the compute benchmarks run (default cpu; cuda uses bf16 autocast)")
    predict = _add_command(
        subparsers, "predict", "what a trained checkpoint says about images",
        ["medistill predict runs/demo/mmpkd-cxr/seed0/student/checkpoints chest.png --out overlays",
         "medistill predict runs/demo/amif-phantom/seed0/full/checkpoints scan.dcm --question 'Is there a mass?' --json",
         "medistill predict runs/demo/clinkd-phantom/student_sft/checkpoints images/ --locate nodule --out boxes"],
        cmd_predict, common)
    predict.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_DIR",
                         help="a checkpoint directory (a run's checkpoints/): classifier, VQA or grounding")
    predict.add_argument("images", type=Path, nargs="+", metavar="IMAGE",
                         help="PNG, JPEG, PGM or DICOM files, folders of them, or .txt list files")
    predict.add_argument("--question", metavar="TEXT", help="the question for a VQA (or grounding) checkpoint")
    predict.add_argument("--locate", metavar="PHRASE", help="what a grounding checkpoint should find")
    predict.add_argument("--json", action="store_true", help="one JSON object per image (JSON lines)")
    predict.add_argument("--out", type=Path, metavar="DIR",
                         help="save each prediction's picture here (attention heatmap, boxes)")
    serve = _add_command(subparsers, "serve", "a local web page to try a checkpoint on your images",
                         ["medistill serve runs/demo/mmpkd-cxr/seed0/student/checkpoints",
                          "medistill serve runs/demo/clinkd-phantom/student_sft/checkpoints --port 8080"],
                         cmd_serve, common)
    serve.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_DIR", help="a checkpoint directory")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    serve.add_argument("--max-upload-mb", type=float, default=50.0, help="largest accepted upload (default 50 MB)")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    parser = Parser(
        prog="medistill", parents=[common], formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Cross-modal knowledge distillation for medical images.",
        epilog=_examples("medistill demo", "medistill data make-phantom --out runs/phantom --cases 200",
                         "medistill train --config configs/demo/classifier.yaml --out runs/cls"),
    )
    parser.add_argument("--version", action="version", version=f"medistill {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    _add_data(subparsers, common)
    _add_train(subparsers, common)
    _add_demo_bench(subparsers, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    from medistill.engine.logging import setup_logging

    setup_logging(1 if getattr(args, "verbose", False) else 0)
    try:
        return args.handler(args)
    except MedistillError as error:
        if debug:
            raise
        sys.stderr.write(f"medistill {args.command}: error: {error}\n")
        return error.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("medistill: interrupted\n")
        return 130
    except Exception as error:  # the last line of defence: one line, the traceback under --debug
        if debug:
            raise
        text = textwrap.shorten(f"{type(error).__name__}: {error}", 300)
        sys.stderr.write(f"medistill {args.command}: internal error: {text} (rerun with --debug for the traceback)\n")
        return 1
