"""Type stubs of the Rust core of dualpipe (the extension module ``dualpipe_rs._core``)."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Literal, Mapping, Optional, Sequence, Union

__version__: str
"""The version of the Rust crates this module was built from."""

Costs = Union[None, Mapping[str, Any], str, "os.PathLike[str]"]
"""A cost model, per stage: ``None`` (the defaults ``f=1,b=2,w=1,fb=f+b,comm=0``), a dict in the
cost-file schema of docs/costs.md (``{"unit": "ms", "f": 1.0, "b": 2.0, "stages": [{"stage": 0,
"f": 1.4}]}``), a
``str`` holding assignments (``"f=1,b=2,w=1,fb=3,comm=0"``: it contains ``=`` and no path
separator) or else the path of a cost file, or an ``os.PathLike`` path of a cost file."""

Model = Literal["blocking", "async"]
"""The execution model: ``"blocking"`` (a commit returns when its whole batch has met its
partners, as the reference implementation) or ``"async"`` (a commit launches its batch on a
communication stream; a compute waits only for its inputs)."""

class ScheduleError(ValueError):
    """A schedule that does not parse or breaks a rule of format v1.

    The message is exactly what ``dualpipe validate`` prints after ``error:``, for example::

        invalid schedule: 1 problem
          rank 1, instruction 1 `F s1 m0`: rule 2 (data dependency): its input activation ...

    (prefixed with ``PATH:`` when the schedule came from :func:`load`). The attributes describe
    the first problem; each is ``None`` where it does not apply.
    """

    rank: Optional[int]
    """The rank of the first problem; ``None`` for a problem of the document header."""
    index: Optional[int]
    """The index of the faulty instruction in the rank's list; ``None`` for a problem of the
    header or of a rank as a whole (something missing from its list)."""
    instruction: Optional[str]
    """The faulty instruction in compact form (``"F s3 m12"``); ``None`` when no single
    instruction is at fault or it does not parse."""
    rule: Optional[str]
    """The rule broken: ``"structure"``, ``"completeness"`` (rule 1), ``"data-dependency"``
    (rule 2), ``"communication"`` (rule 3) or ``"progress"`` (rule 4); ``None`` when the
    document does not parse (not JSON, a wrong field, an unknown op)."""
    problems: Sequence[Dict[str, Any]]
    """Every problem found, in the validator's order: dicts with the keys ``rank``, ``index``,
    ``instruction``, ``rule`` (as above) and ``message`` (the problem in words, without its
    location)."""

class Schedule:
    """A schedule that passed every rule of format v1 (docs/format.md). Immutable.

    Get one from :func:`plan`, :func:`load` or :meth:`Schedule.from_json`; each validates. Two
    schedules are equal when their documents are; a schedule is hashable and pickles (as its
    JSON document, validated again on unpickling).
    """

    @staticmethod
    def from_json(text: str) -> Schedule:
        """Parses and validates a format-v1 JSON document.

        Raises:
            ScheduleError: the text is not a v1 document, or the schedule breaks a rule.
        """
    def to_json(self) -> str:
        """The document in the canonical layout ``dualpipe plan`` writes (one instruction per
        line, final newline); planned schedules are byte-identical to ``schedules/*.json``."""
    @property
    def name(self) -> str:
        """The ``schedule`` field: the family that produced it (``"dualpipev"``) or any label."""
    @property
    def num_ranks(self) -> int:
        """Number of ranks."""
    @property
    def num_stages(self) -> int:
        """Number of stages the model is cut into."""
    @property
    def num_microbatches(self) -> int:
        """Number of micro-batches per step."""
    @property
    def forward_only(self) -> bool:
        """Whether the schedule is an inference step (forwards only)."""
    @property
    def pipelines(self) -> List[Dict[str, List[int]]]:
        """The routes, as in the JSON document: ``[{"route": [...], "microbatches": [...]}]``;
        ``route[s]`` is the rank that runs stage ``s`` for the pipeline's micro-batches."""
    def stages_on(self, rank: int) -> List[int]:
        """The distinct stages ``rank`` runs, in the order a runtime takes its modules.

        Rule: the pipelines in document order (those that carry at least one micro-batch),
        within one pipeline by ascending stage number, each stage at its first appearance.
        This gives the families' conventions: DualPipe rank r -> ``[r, N-1-r]`` (for every r,
        as the reference's ``(full_modules[r], full_modules[N-1-r])``), DualPipeV and ZB-V
        ``[r, 2N-1-r]``, interleaved 1F1B ``[r, r+N, r+2N, ...]``, the others ``[r]``.

        Raises:
            IndexError: ``rank`` is not in ``range(num_ranks)``.
        """
    def instructions(self, rank: int) -> List[Dict[str, Any]]:
        """Rank ``rank``'s instruction list, each instruction as its JSON object:
        ``{"op": "F", "stage": 0, "mb": 0}``, ``{"op": "B", "stage", "mb", "defer_w": bool}``
        (``defer_w`` always present), ``{"op": "W", "stage", "mb"}``,
        ``{"op": "FB", "f": {"stage", "mb"}, "b": {"stage", "mb"}}``,
        ``{"op": "send" | "recv", "kind": "act" | "grad", "stage", "mb", "peer"}``,
        ``{"op": "commit"}``.

        Raises:
            IndexError: ``rank`` is not in ``range(num_ranks)``.
        """
    def instruction_text(self, rank: int) -> List[str]:
        """Rank ``rank``'s instruction list in compact form (``"F s3 m12"``,
        ``"send act s3 m12 -> r4"``, ``"FB F s0 m7 + B s7 m3"``, ``"commit"``), as errors print.

        Raises:
            IndexError: ``rank`` is not in ``range(num_ranks)``.
        """
    def simulate(self, costs: Costs = None, model: Model = "blocking", timeline: bool = False) -> Dict[str, Any]:
        """Simulates one step: exactly the document ``dualpipe simulate --json`` prints, as a dict.

        Keys: ``schedule``, ``num_ranks``, ``num_stages``, ``num_microbatches``, ``model``,
        ``costs`` (the cost model in words), ``unit`` (the costs' time unit, in which every
        time is given; ``""`` for abstract units), ``costs_per`` (``"stage"``), ``makespan``
        (the step time), ``bubble_share``
        (idle over ranks x makespan), ``ranks`` (per rank ``{"rank", "busy", "idle", "end",
        "peak_activations", "peak_pending_w"}``) and, with ``timeline``, ``instructions`` (per
        rank, per instruction ``{"index", "instruction", "start", "end"}``, as ``--timeline``).
        Times are rounded to 1e-9. See docs/simulate.md.

        Raises:
            ValueError: a bad cost model (naming the field) or model name.
            OSError: a cost file that cannot be read.
            TypeError: ``costs`` of another type.
        """
    def render(self, format: Literal["text", "svg", "chrome"], costs: Costs = None, model: Model = "blocking") -> str:
        """The simulated timeline drawn as ``dualpipe render --format FORMAT`` does: a
        time-scaled text grid, an SVG picture, or a Chrome trace (JSON; in real time when the
        costs name their ``unit``, else one abstract time unit written as one millisecond).

        Raises:
            ValueError: an unknown format, a bad cost model or model name.
            OSError: a cost file that cannot be read.
        """
    def to_torch_csv(self, with_comms: bool = False) -> str:
        """torch.distributed.pipelining's CSV of the schedule, as ``dualpipe convert --to
        torch-csv`` writes it: the compute order, with ``with_comms`` also the sends and
        receives.

        Raises:
            ValueError: the schedule cannot be written for torch (DualPipe runs each stage on
                two ranks).
        """
    def __eq__(self, other: object) -> bool: ...
    def __hash__(self) -> int: ...
    def __reduce__(self) -> Any: ...

def plan(name: str, ranks: int, microbatches: int, chunks_per_rank: Optional[int] = None, forward_only: bool = False, costs: Costs = None) -> Schedule:
    """Plans one step of a schedule family, validated.

    Args:
        name: ``dualpipe``, ``dualpipev``, ``1f1b``, ``gpipe``, ``zb1p``, ``zbv`` or
            ``interleaved-1f1b`` (see :func:`families`).
        ranks: the number of ranks N.
        microbatches: the number of micro-batches C per step.
        chunks_per_rank: stages per rank V, for ``interleaved-1f1b`` only (default 2).
        forward_only: plan an inference step (forwards only).
        costs: the costs to place the messages of the lowered families (``1f1b``, ``gpipe``,
            ``zb1p``, ``zbv``, ``interleaved-1f1b``) for, in any form :meth:`Schedule.simulate`
            takes; None for the defaults. The compute order does not depend on them.

    Raises:
        ValueError: an unknown family, parameters the family does not accept, or costs that
            are invalid or name stages the schedule does not have; the message is the
            planner's, as ``dualpipe plan`` prints it.
        TypeError: ``costs`` of another type.
    """

def families() -> List[Dict[str, str]]:
    """The families the planner knows, in the CLI's order: ``{"name": "dualpipev",
    "constraint": "ranks N >= 1 and micro-batches C >= 2N", "stages": "2N"}``; ``stages`` is the
    number of stages as a formula of N (and V, the chunks per rank)."""

def load(path: Union[str, "os.PathLike[str]"]) -> Schedule:
    """Reads, parses and validates a schedule file.

    Raises:
        OSError: the file cannot be read (``FileNotFoundError``, ``PermissionError``, ...).
        ScheduleError: the file is not a v1 document or the schedule breaks a rule; the message
            starts with the path, as ``dualpipe validate`` prints it.
    """

def partition(
    layers: Union[Sequence[Mapping[str, Any]], str, "os.PathLike[str]"],
    schedule: Optional[Schedule] = None,
    *,
    family: Optional[str] = None,
    ranks: Optional[int] = None,
    microbatches: Optional[int] = None,
    chunks_per_rank: Optional[int] = None,
    memory_cap: Optional[float] = None,
    max_evaluations: Optional[int] = None,
) -> Dict[str, Any]:
    """Cuts a model's layers into contiguous stages that minimise the simulated step time of a
    schedule: exactly the document ``dualpipe partition --json`` prints, as a dict.

    Args:
        layers: one dict per layer in model order, ``{"name": "embed", "f": 1.0, "b": 2.0,
            "w": 1.0, "param_bytes": 4096, "activation_bytes": 1024}`` (``f`` and ``b``
            required, the rest optional; unknown keys are errors), or the path of a layers file
            (``{"unit": "ms", "layers": [...]}``, docs/partition.md).
        schedule: the schedule to partition for; else ``family``, ``ranks`` and
            ``microbatches`` (and ``chunks_per_rank`` for ``interleaved-1f1b``) plan one.
        memory_cap: most bytes any rank may hold (parameters plus peak activations).
        max_evaluations: most simulations the refinement may run (default 256; 0 keeps the
            bottleneck optimum).

    Returns:
        ``{"objective", "ranges" ([[start, end], ...] half-open per stage), "stages"
        ([{"stage", "ranks", "layers", "f", "b", "w", "param_bytes", "activation_bytes"}]),
        "predicted_step", "bottleneck", "rank_load", "peak_memory", "equal_cut_step",
        "bottleneck_optimum", "equal_cut", ...}``.

    Raises:
        ValueError: bad layers (the message names the layer index and field), fewer layers than
            stages, a memory cap no cut meets, or schedule arguments the planner refuses.
        TypeError: ``layers`` is neither a list of dicts nor a path.
        OSError: the layers file cannot be read.
    """


def tune(
    costs: Union[Mapping[str, Any], str, "os.PathLike[str]"],
    ranks: int,
    global_batch: int,
    *,
    microbatch_sizes: Optional[Sequence[int]] = None,
    memory_cap: Optional[float] = None,
    chunks_per_rank: Optional[int] = None,
    model: str = "blocking",
    measured_at: Optional[float] = None,
    synthesize: Optional[float] = None,
) -> Dict[str, Any]:
    """Ranks every schedule family at every micro-batch size dividing ``global_batch`` under
    measured costs: the document ``dualpipe tune --json`` prints, as a dict, plus the best
    candidate planned under ``"schedule"`` (a :class:`Schedule`, or None when nothing fits).

    Args:
        costs: a cost file as a dict, assignments (``"f=1,b=2"``) or a path (as for
            :meth:`Schedule.simulate`), e.g. what ``Pipeline(..., profile=True)``'s
            ``profile.costs()`` writes. It must say the micro-batch size it was measured at
            (``microbatch_size``), or give ``measured_at``.
        ranks: pipeline ranks N.
        global_batch: samples per training step.
        microbatch_sizes: the sizes to try (default: every divisor of ``global_batch``).
        memory_cap: most bytes one rank may hold (parameters plus live activations).
        chunks_per_rank: stages per rank of ``interleaved-1f1b`` (default 2).
        model: ``"blocking"`` or ``"async"``.
        measured_at: the micro-batch size the costs were measured at, if they do not say.
        synthesize: seconds for the schedule synthesiser (shared over the micro-batch
            sizes): its rows, family ``"synthesized"``, are ranked with the families' and
            ``"schedule"`` is its schedule when it ranks first.

    Returns:
        ``{"ranks", "global_batch", "model", "unit", "measured_microbatch_size", "memory_cap",
        "microbatch_sizes", "skipped_sizes", "best", "ranked", "over_cap", "not_applicable",
        "schedule"}``; each row of ``ranked`` is ``{"family", "microbatch_size",
        "microbatches", "stages", "basis", "step_time", "time_per_sample", "bubble_share",
        "peak_memory", "parameter_bytes", "activation_bytes", "peak_activations",
        "parameter_copies"}``.

    Raises:
        ValueError: bad arguments or costs, with the message ``dualpipe tune`` prints.
    """

def _schedule_from_json(text: str) -> Schedule:
    """:meth:`Schedule.from_json` as a module function (used when unpickling)."""
