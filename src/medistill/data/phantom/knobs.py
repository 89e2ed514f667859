"""The phantom world's knobs: what a user may turn, with defaults that make the privileged modality worth having."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from medistill.errors import UsageError


@dataclass(frozen=True)
class PhantomKnobs:
    """Settings of the synthetic world. The CLI turns each field into a `--field-name` flag."""

    subtlety: float = field(default=0.3, metadata={
        "help": "how faint lesions are, 0 (conspicuous) to 0.95 (nearly invisible); lesion contrast is "
                "scaled by (1 - subtlety). At the default lesions are faint but learnable"})
    label_noise: float = field(default=0.05, metadata={
        "help": "share of training-split labels flipped (per label); validation and test labels stay clean"})
    report_completeness: float = field(default=0.9, metadata={
        "help": "probability that the report mentions each true finding (0..1)"})
    hedging: float = field(default=0.2, metadata={
        "help": "probability that a mentioned finding is hedged ('possible', 'cannot exclude')"})
    image_size: int = field(default=256, metadata={"help": "image width and height in pixels (32..1024)"})
    noise: float = field(default=1.0, metadata={
        "help": "multiplier of the acquisition noise (0 = noiseless, 1 = default, up to 4)"})
    test_fraction: float = field(default=0.2, metadata={"help": "share of cases in the test split"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of cases in the validation split"})

    def validate(self) -> PhantomKnobs:
        """Raise UsageError naming the first out-of-range knob; return self so calls can chain."""
        ranges = {
            "subtlety": (0.0, 0.95),
            "label_noise": (0.0, 0.5),
            "report_completeness": (0.0, 1.0),
            "hedging": (0.0, 1.0),
            "image_size": (32, 1024),
            "noise": (0.0, 4.0),
            "test_fraction": (0.0, 0.9),
            "val_fraction": (0.0, 0.9),
        }
        for knob in fields(self):
            value = getattr(self, knob.name)
            low, high = ranges[knob.name]
            expected = int if knob.type in ("int", int) else (int, float)
            if isinstance(value, bool) or not isinstance(value, expected):
                raise UsageError(f"phantom knob {knob.name} must be a number, not {value!r}")
            if not low <= value <= high:
                flag = "--" + knob.name.replace("_", "-")
                raise UsageError(f"phantom knob {knob.name}={value} is out of range: pass {flag} between {low} and {high}")
        if self.test_fraction + self.val_fraction >= 1.0:
            raise UsageError(
                f"test_fraction + val_fraction = {self.test_fraction + self.val_fraction} leaves no training cases: "
                "make their sum smaller than 1")
        return self
