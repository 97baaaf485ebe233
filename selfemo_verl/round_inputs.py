"""What a self-evolution round starts from, checked before it starts (issue 13): its data and its model.

Core module (no verl, no ray). The recipes call the CLI:

    python -m selfemo_verl.round_inputs data meld DATA_DIR --raw-dir "$RAW_DIR" --offline-dir ../shared/data/meld
    python -m selfemo_verl.round_inputs export ROUND_DIR/ckpt actor/huggingface   # prints round r+1's model

- `data`: round 0's DATA_DIR/{train,val,test}.parquet, written once by data_prep/prepare_erc.py from RAW_DIR
  when set, else from `--offline-dir` when that folder exists (our development machines, offline), else from the
  official CSVs downloaded into DATA_DIR/raw (MELD, EmoryNLP: a pinned commit, sha256-checked by
  `selfemo_verl.data.erc_download`). IEMOCAP cannot be downloaded: without RAW_DIR it stops, exit 2.
- `export`: round r+1 starts from the HF export of round r's last checkpoint. config.json alone is not enough
  (FSDP writes it even when no weights were saved): the weight files must be there and hold the parameters.
A refusal prints `round_inputs: error: <path or variable>: <reason>` on stderr and exits 2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from selfemo_verl.preflight import PreflightError, estimate_params

WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
_DTYPE_BYTES = {"int8": 1, "uint8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}  # every other dtype: 2
_GB = 1e9
PREPARE_ERC = Path(__file__).resolve().parents[1] / "data_prep" / "prepare_erc.py"
IEMOCAP_REFUSAL = ("RAW_DIR: not set, and IEMOCAP cannot be downloaded (USC licenses it for research and forbids "
                   "redistribution): request it from USC (https://sail.usc.edu/iemocap/), then set RAW_DIR to your "
                   "copy of iemocap.{train,valid,test}.json")


def min_weight_bytes(hf: dict) -> float:
    """The least an export of this config.json holds: 0.9 x parameters (`estimate_params`) x bytes per parameter.

    Bytes per parameter: 2 for 16- and 32-bit dtypes (bf16 is the smallest an unquantized export is written in; a
    float32 config may be exported in bf16), 1 for 8-bit ones.

    >>> tiny = {"vocab_size": 100, "hidden_size": 8, "num_hidden_layers": 1, "intermediate_size": 16,
    ...         "num_attention_heads": 2, "tie_word_embeddings": True, "dtype": "bfloat16"}
    >>> estimate_params(tiny), round(min_weight_bytes(tiny), 1)   # 800 + (256 + 384 + 16) + 8 parameters
    (1464, 2635.2)
    """
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "bfloat16")
    return 0.9 * estimate_params(hf) * _DTYPE_BYTES.get(dtype, 2)


def check_export(hf_dir: Path) -> float:
    """The HF export in `hf_dir` holds its weights (`*.safetensors` / `pytorch_model*.bin`, every shard its index
    names, at least `min_weight_bytes` in all); returns their size in bytes."""
    if not (hf_dir / "config.json").is_file():
        raise PreflightError(f"{hf_dir}: no HF model (config.json); the checkpoint's save_contents must hold hf_model")
    files = sorted({path for pattern in WEIGHT_GLOBS for path in hf_dir.glob(pattern)})
    for index in hf_dir.glob("*.index.json"):
        missing = sorted(set(json.loads(index.read_text())["weight_map"].values()) - {p.name for p in files})
        if missing:
            raise PreflightError(f"{hf_dir}: {index.name} names missing shards: {', '.join(missing)}")
    if not files:
        raise PreflightError(f"{hf_dir}: config.json but no weight files ({', '.join(WEIGHT_GLOBS)}); the export "
                             "saved no weights, so the next round cannot start from it")
    size = float(sum(path.stat().st_size for path in files))
    need = min_weight_bytes(json.loads((hf_dir / "config.json").read_text()))
    if size < need:
        raise PreflightError(f"{hf_dir}: the weight files hold {size / _GB:.3g} GB, less than the {need / _GB:.3g} GB "
                             "that config.json's parameter count needs (0.9 x parameters x 2 bytes); a partial export")
    return size


def last_export(ckpt_dir: Path, hf_subdir: str) -> Path:
    """The HF directory of the last checkpoint verl saved in `ckpt_dir`, its weights checked (`check_export`)."""
    latest = ckpt_dir / "latest_checkpointed_iteration.txt"
    if not latest.is_file():
        raise PreflightError(f"{latest}: missing; the round saved no checkpoint (trainer.save_freq must be > 0)")
    hf_dir = ckpt_dir / f"global_step_{latest.read_text().strip()}" / hf_subdir
    check_export(hf_dir)
    return hf_dir


def source_args(dataset: str, data_dir: str, raw_dir: str, offline_dir: str) -> list[str]:
    """prepare_erc.py's source arguments: RAW_DIR, else the offline copy when it exists, else a download.

    >>> source_args("meld", "data/meld", "", "/no/such/dir")
    ['--raw-dir', 'data/meld/raw', '--download']
    >>> source_args("iemocap", "data/iemocap", "/data/iemocap", "/no/such/dir")
    ['--raw-dir', '/data/iemocap']
    """
    if raw_dir:
        return ["--raw-dir", raw_dir]
    if offline_dir and Path(offline_dir).is_dir():
        return ["--raw-dir", offline_dir]
    if dataset == "iemocap":
        raise PreflightError(IEMOCAP_REFUSAL)
    return ["--raw-dir", str(Path(data_dir) / "raw"), "--download"]


def prepare_data(args: argparse.Namespace) -> int:
    """Write DATA_DIR's parquet with data_prep/prepare_erc.py unless DATA_DIR/train.parquet exists; its exit status."""
    if (Path(args.data_dir) / "train.parquet").is_file():
        return 0
    command = [sys.executable, str(PREPARE_ERC), "--dataset", args.dataset,
               *source_args(args.dataset, args.data_dir, args.raw_dir, args.offline_dir), "--out-dir", args.data_dir]
    command += ["--base-url", args.base_url] if args.base_url else []
    command += ["--window", str(args.window)] if args.window else []
    print("+ " + shlex.join(command), flush=True)
    return 0 if args.dry_run else subprocess.run(command).returncode


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m selfemo_verl.round_inputs", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="print the last checkpoint's HF directory; exit 2 without weights")
    export.add_argument("ckpt_dir", type=Path)
    export.add_argument("hf_subdir", help="actor/huggingface (FSDP) or actor/model/huggingface (Megatron)")
    data = commands.add_parser("data", help="prepare DATA_DIR's parquet unless DATA_DIR/train.parquet exists")
    data.add_argument("dataset", choices=("meld", "emorynlp", "iemocap"))
    data.add_argument("data_dir")
    data.add_argument("--raw-dir", default="", help="RAW_DIR (empty: not set)")
    data.add_argument("--offline-dir", default="", help="raw files used without RAW_DIR when the folder exists")
    data.add_argument("--base-url", default="", help="download mirror (empty: prepare_erc.py's pinned default)")
    data.add_argument("--window", type=int, default=0, help="prepare_erc.py --window (0: its default)")
    data.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "export":
            print(last_export(args.ckpt_dir, args.hf_subdir))
            return 0
        return prepare_data(args)
    except PreflightError as err:
        print(f"round_inputs: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
