"""scrimp.tessy: TESSY, teacher-student cooperative synthesis of style-consistent SFT data.

Capability tokens (numbers, steps, code) come from the teacher, style tokens
(connectives, fillers, tone) from the student, so that the student is fine-tuned
on traces written largely in its own style::

    from scrimp import tessy
    teacher = tessy.LocalBackend.from_pretrained("testbed:arith-teacher")
    student = tessy.LocalBackend.from_pretrained("testbed:arith-student")
    summary = tessy.run_synthesis(problems, teacher, student,
                                  tessy.LexiconPredictor("teacher"), tessy.LexiconPredictor("student"),
                                  tessy.TessyConfig(teacher_step=20, student_step=20), out_path="tessy.jsonl")

See docs/tessy.md.
"""
from .predictor import (BoundaryPredictor, Cut, LexiconPredictor, Predictor, evaluate_predictor,
                        load_predictor, testbed_examples, train_predictor)
from .backends import BackendError, GenParams, GenResult, LocalBackend, RemoteBackend
from .synth import TessyConfig, find_repetition, run_synthesis, synthesize
from .output import JsonlWriter, format_stats, latest_records, stats, to_chat_records, write_chat
from .annotate import EndpointAnnotator, LocalAnnotator, annotate_texts, annotation_prompt, parse_annotation


def demo_section(quick: bool = True) -> str:
    from .demo import demo_section as _d
    return _d(quick=quick)


__all__ = [
    "BoundaryPredictor", "Cut", "LexiconPredictor", "Predictor", "evaluate_predictor", "load_predictor",
    "testbed_examples", "train_predictor", "BackendError", "GenParams", "GenResult", "LocalBackend",
    "RemoteBackend", "TessyConfig", "find_repetition", "run_synthesis", "synthesize", "JsonlWriter",
    "format_stats", "latest_records", "stats", "to_chat_records", "write_chat", "EndpointAnnotator",
    "LocalAnnotator", "annotate_texts", "annotation_prompt", "parse_annotation", "demo_section",
]
