"""scrimp.tessy: TESSY, teacher-student cooperative synthesis of style-consistent SFT data.

Capability tokens (numbers, steps, code) come from the teacher, style tokens
(connectives, fillers, tone) from the student, so that the student is fine-tuned
on traces written largely in its own style::

    from scrimp import tessy
    teacher = tessy.LocalBackend.from_pretrained("testbed:arith-teacher", device="auto")
    student = tessy.LocalBackend.from_pretrained("testbed:arith-student", device="auto")
    summary = tessy.run_synthesis(problems, teacher, student,
                                  tessy.LexiconPredictor("teacher"), tessy.LexiconPredictor("student"),
                                  tessy.TessyConfig(teacher_step=20, student_step=20), out_path="tessy.jsonl")

See docs/tessy.md.
"""
from .predictor import (BoundaryPredictor, Cut, LexiconPredictor, Predictor, WordTokenizer, evaluate_predictor,
                        load_predictor, train_predictor)
from .backends import DECODING_MODES, BackendError, GenParams, GenResult, LocalBackend, RemoteBackend
from .synth import (TessyConfig, check_marker_pair, find_repetition, normalise_problem, read_problems,
                    run_synthesis, synthesize)
from .output import JsonlWriter, format_stats, latest_records, stats, to_chat_records, write_chat
from .annotate import EndpointAnnotator, LocalAnnotator, annotate_texts, annotation_prompt, parse_annotation


def demo_section(quick: bool = True) -> str:
    from .demo import demo_section as _d
    return _d(quick=quick)


def __getattr__(name):
    # ground-truth predictor data from the testbed generator: imported (with the testbed) on first use
    if name == "testbed_examples":
        from .cli import testbed_examples
        return testbed_examples
    raise AttributeError(f"module 'scrimp.tessy' has no attribute {name!r}")


__all__ = [
    "BoundaryPredictor", "Cut", "LexiconPredictor", "Predictor", "WordTokenizer", "evaluate_predictor",
    "load_predictor", "train_predictor", "DECODING_MODES", "BackendError", "GenParams", "GenResult",
    "LocalBackend", "RemoteBackend", "TessyConfig", "check_marker_pair", "find_repetition", "normalise_problem",
    "read_problems", "run_synthesis", "synthesize", "JsonlWriter", "format_stats", "latest_records", "stats",
    "to_chat_records", "write_chat", "EndpointAnnotator", "LocalAnnotator", "annotate_texts", "annotation_prompt",
    "parse_annotation", "demo_section",
]
