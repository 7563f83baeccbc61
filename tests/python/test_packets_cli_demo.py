"""The `scrimp packets` CLI is registered with its options and the demo section prints."""
import scrimp.packets as P
from scrimp import cli


def test_cli_registered():
    parser = cli.build_parser()
    args = parser.parse_args(["packets", "eval", "--n", "3", "--methods", "full", "kvpacket"])
    assert args.n == 3 and args.methods == ["full", "kvpacket"] and args.model == "testbed:recall"
    args = parser.parse_args(["packets", "train", "--n-train", "4", "--max-minutes", "0.5"])
    assert args.n_train == 4 and args.max_minutes == 0.5 and args.n_header == 8 and args.n_trailer == 8
    args = parser.parse_args(["packets", "train", "--model", "/ckpt", "--data", "d.jsonl", "--out", "a.safetensors",
                              "--steps", "7", "--resume", "--json", "m.json", "--quiet", "--dtype", "bfloat16"])
    assert (args.model, args.data, args.out, args.steps, args.resume, args.json, args.dtype) == (
        "/ckpt", "d.jsonl", "a.safetensors", 7, True, "m.json", "bfloat16")


def test_demo_section_prints():
    text = P.demo_section(quick=True)
    assert "KV Packet" in text and "MiB" in text
