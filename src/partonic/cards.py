"""Process cards: YAML files loaded into typed, validated models.

A card is the whole truth of a run. Every section rejects unknown keys, every
number has its allowed range, and a bad card fails before any work starts with a
message that names the field path, the bad value and what is allowed.
``--set a.b=value`` overrides are applied to the YAML before validation, so they
are checked the same way.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "CardError",
    "Card",
    "UnfoldCard",
    "UnweightCard",
    "GenerateCard",
    "load_card",
    "parse_card",
    "apply_overrides",
    "card_to_dict",
    "section_hash",
]


class CardError(ValueError):
    """A card that cannot be read or does not validate."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PositiveFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
PositiveInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(gt=0, lt=1)]


# ---------------------------------------------------------------- common parts
class PDFSection(Strict):
    """Parton densities: an LHAPDF6 set by name (LHAPDF_DATA_PATH or pythia8mc's pdfdata)."""

    set: str = "NNPDF23_lo_as_0130_qed"
    member: NonNegInt = 0
    backend: Literal["auto", "grid", "lhapdf"] = "auto"
    interpolation: Literal["logbicubic", "lagrange"] = "logbicubic"


class AlphaSSection(Strict):
    value_mz: Fraction = 0.130
    order: Literal[0, 1, 2, 3] = 1


class ElectroweakSection(Strict):
    """Fixed electroweak inputs (defaults: MG5 'sm'). ``sin2_w_bar`` enters only the
    vector couplings (Pythia 8 style); ``width: running`` uses ŝΓ/M in the propagator."""

    alpha_em: Annotated[float, Field(gt=0.005, lt=0.01)] = 1.0 / 132.507
    m_z: Annotated[float, Field(gt=80, lt=100)] = 91.188
    gamma_z: Annotated[float, Field(gt=1, lt=4)] = 2.4414
    sin2_w: Annotated[float, Field(gt=0.2, lt=0.25)] = 0.22224653
    sin2_w_bar: Optional[Annotated[float, Field(gt=0.2, lt=0.25)]] = None
    width: Literal["fixed", "running"] = "fixed"


class PhysicsSection(Strict):
    sqrt_s: PositiveFloat = 13000.0
    beams: tuple[int, int] = (2212, 2212)
    pdf: PDFSection = PDFSection()
    alpha_s: AlphaSSection = AlphaSSection()
    electroweak: ElectroweakSection = ElectroweakSection()


class OptimizerSection(Strict):
    name: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"
    lr: Annotated[float, Field(gt=0, le=10)] = 1e-3
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    weight_decay: NonNegFloat = 0.0
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.0


class ScheduleSection(Strict):
    name: Literal["constant", "cosine", "step", "exponential", "onecycle"] = "cosine"
    warmup_steps: NonNegInt = 0
    step_size: PositiveInt = 1000
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.5
    min_lr_factor: Annotated[float, Field(ge=0, le=1)] = 0.01


class NanGuardSection(Strict):
    """A step whose loss or gradients are not finite is skipped and the learning
    rate multiplied by ``lr_factor``; ``max_bad_steps`` in a row stop the run."""

    max_bad_steps: PositiveInt = 10
    lr_factor: Fraction = 0.5


class TrainingSection(Strict):
    optimizer: OptimizerSection = OptimizerSection()
    schedule: ScheduleSection = ScheduleSection()
    batch_size: PositiveInt = 512
    epochs: PositiveInt = 20
    max_steps: Optional[PositiveInt] = None
    #: wall-clock budget of one training in seconds: after the first steps the number of
    #: steps (and with it the learning-rate schedule) is fitted to it; never more than
    #: epochs / max_steps give (train.py, ``plan_to_time_limit``)
    time_limit_s: Optional[PositiveFloat] = None
    grad_clip: Optional[PositiveFloat] = 10.0
    checkpoint_every: PositiveInt = 500
    log_every: PositiveInt = 50
    validation_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1
    #: end with the parameters of the epoch with the lowest validation loss, not the last
    keep_best: bool = False
    nan_guard: NanGuardSection = NanGuardSection()

    @model_validator(mode="after")
    def _best_needs_validation(self):
        if self.keep_best and self.validation_fraction == 0:
            raise ValueError("training.keep_best = true picks the epoch with the lowest validation loss, so it needs training.validation_fraction > 0")
        return self


class LHEOutputSection(Strict):
    write: bool = True
    compress: bool = False
    max_events: Optional[PositiveInt] = None


class CommonCard(Strict):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.+-]+$")]
    seed: NonNegInt = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    output: Optional[str] = None
    physics: PhysicsSection = PhysicsSection()
    training: TrainingSection = TrainingSection()
    lhe: LHEOutputSection = LHEOutputSection()


def _require_files(data, simulated: str) -> None:
    """A data section that reads files (any source but the simulated one) needs them."""
    if data.source != simulated and not data.files:
        raise ValueError(f"data.source = {data.source!r} needs data.files (a list of paths)")


# ------------------------------------------------------------------- unfold
class DetectorSection(Strict):
    """Parametrised detector response (simulate/detector.py). Defaults: the Delphes
    ATLAS card (HCAL resolution for jets, muon resolution and efficiencies for
    leptons, isolation cone); ``jet_angle_resolution`` is an estimate."""

    jet_radius: Annotated[float, Field(gt=0, le=1.5)] = 0.4
    jet_pt_min: NonNegFloat = 25.0
    jet_eta_max: PositiveFloat = 2.5
    max_jets: Annotated[int, Field(ge=2, le=6)] = 4
    jet_resolution_central: tuple[NonNegFloat, NonNegFloat, NonNegFloat] = (1.59, 0.5205, 0.0302)
    jet_resolution_forward: tuple[NonNegFloat, NonNegFloat, NonNegFloat] = (0.0, 0.706, 0.05)
    jet_forward_eta: PositiveFloat = 1.7
    jet_angle_resolution: NonNegFloat = 0.02
    lepton_resolution_barrel: tuple[NonNegFloat, NonNegFloat] = (0.015, 1.5e-4)
    lepton_resolution_endcap: tuple[NonNegFloat, NonNegFloat] = (0.025, 3.5e-4)
    lepton_barrel_eta: PositiveFloat = 1.5
    lepton_efficiency_barrel: Annotated[float, Field(gt=0, le=1)] = 0.95
    lepton_efficiency_endcap: Annotated[float, Field(gt=0, le=1)] = 0.85
    lepton_pt_min: NonNegFloat = 20.0
    lepton_eta_max: PositiveFloat = 2.5
    isolation_dr: Annotated[float, Field(gt=0, le=1.5)] = 0.5
    isolation_ratio: PositiveFloat = 0.12


def _collection_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name):
        raise ValueError(f"{name!r} is not a Delphes tree or collection name (letters, digits and _, as in Jet or JetPUPPI; "
                         "the leaves PT, Eta, … are added by the reader)")
    return name


_COLLECTION = Annotated[str, AfterValidator(_collection_name)]


class DelphesSection(Strict):
    """Where a Delphes ROOT file (data.source = delphes, or ``unfold --input``) holds the
    objects: the tree and the jet, electron and muon collections (the Delphes cards'
    default names; e.g. ``jets: JetPUPPI`` for the CMS card's PUPPI jets). Each
    collection needs the leaves of Delphes' own: PT, Eta, Phi and Mass or Charge."""

    tree: _COLLECTION = "Delphes"
    jets: _COLLECTION = "Jet"
    electrons: _COLLECTION = "Electron"
    muons: _COLLECTION = "Muon"


class UnfoldData(Strict):
    source: Literal["pythia", "hdf5", "delphes"] = "pythia"
    files: list[str] = []
    n_events: PositiveInt = 100_000
    test_fraction: Fraction = 0.2
    z_decay: list[Literal[11, 13]] = [11, 13]
    isr: bool = True
    fsr: bool = True
    hadronisation: bool = True
    mpi: bool = False
    workers: NonNegInt = 0
    #: train also on every training event rotated by π about the x axis (η → −η,
    #: φ → −φ for every object): an exact symmetry of pp collisions seen by a
    #: forward-backward symmetric detector, so it doubles the training data for free
    symmetrise: bool = True
    #: oversample the rarer jet channels in training: an event of a channel holding
    #: the fraction f of the training events is drawn with weight f^(−channel_balance)
    #: (0: as generated; 1: every channel equally often). The jet count is part of the
    #: condition, so this leaves the posterior p(parton | detector) unchanged; it only
    #: moves training effort to the 3- and ≥ 4-jet events
    channel_balance: Annotated[float, Field(ge=0, le=1)] = 0.0
    #: train also on this many more detector realisations of the simulated events
    #: (smearing, efficiencies and selection drawn anew; parton and particle level
    #: fixed); the events behind the validation and test sets are left out (source pythia)
    resmear: Annotated[int, Field(ge=0, le=16)] = 0
    #: skip the particle-level objects (the loop over the hadrons, lepton isolation,
    #: jet clustering) of events whose two Z-decay leptons, after QED radiation, fail
    #: |η| < detector.lepton_eta_max or lie 6 standard deviations of the lepton pT
    #: resolution below detector.lepton_pt_min (jobs/unfold.py, lepton_veto_cuts): the
    #: detector leaves lepton directions alone, so such an event is selected only when
    #: another isolated lepton (from a hadron decay) stands in for a Z lepton, 1 of the
    #: 59 755 selected events of cards/zw.yaml. The events kept are unchanged and the
    #: simulation about 1.4 times faster (source pythia; the cuts are part of the cache key)
    lepton_veto: bool = True
    detector: DetectorSection = DetectorSection()
    delphes: DelphesSection = DelphesSection()

    @model_validator(mode="after")
    def _files_for_file_sources(self):
        _require_files(self, "pythia")
        if not self.z_decay:
            raise ValueError("data.z_decay needs at least one lepton flavour (11 or 13)")
        if self.resmear and self.source != "pythia":
            raise ValueError(f"data.resmear = {self.resmear} re-simulates the detector, so it needs data.source = pythia (got {self.source})")
        return self


class MMDSection(Strict):
    weight: NonNegFloat = 0.0
    widths: list[PositiveFloat] = [2.0, 8.0, 25.0, 67.0]


class RefineSection(Strict):
    #: "none", or "classifier": a classifier between the training events' parton truth
    #: and the cINN's own samples for the same detector events gives the density ratio
    #: r = p_truth / p_cINN of a parton configuration; unfolding then resamples each
    #: event's posterior samples in proportion to r (models/cinn.py, Unfolder.fit_refiner)
    method: Literal["none", "classifier"] = "none"
    #: cINN samples per training event in the classifier's "generated" class
    samples: Annotated[int, Field(ge=1, le=64)] = 2
    epochs: Annotated[int, Field(ge=1, le=1000)] = 20
    width: Annotated[int, Field(ge=4, le=4096)] = 256
    layers: Annotated[int, Field(ge=1, le=8)] = 3
    #: classifiers fitted one after the other with their own seeds (initial weights, batch
    #: order, validation events); the ratio is their geometric mean (bagging). One fit's
    #: correction scatters by 2–4% from seed to seed where it is large (the soft quarks;
    #: docs/results.md, "The refiner's fit scatter"); K fits cut that by √K for K times
    #: the fit time
    fits: Annotated[int, Field(ge=1, le=16)] = 1
    #: the events the classifier learns from: 0, the cINN's training events (with their
    #: data.resmear realisations); N > 0, N more generated events simulated for it alone
    #: (data.source = pythia; seed + 10⁶, data.resmear + 1 detector realisations each),
    #: which the cINN has never seen (docs/results.md, "Sampling: the condition network")
    independent_events: NonNegInt = 0
    #: what the classifier sees besides the channel and the lepton flavour: "partons", the
    #: parton features in the W candidate's frame and log pT, η of both quarks; "jets",
    #: also each quark's signed (Δη, Δφ) to the nearer jet of the W candidate and every
    #: detector feature of the condition. With "jets" it tells the cINN's samples from the
    #: truth far better (the quarks' distance to their jets) and its ratio varies strongly
    #: over an event's samples: use it with evaluation.refine_oversample (docs/results.md,
    #: "A refiner that sees the quark–jet distances")
    #: "partons_then_jets": two classifiers, the "partons" one first, then a "jets" one
    #: against the samples weighted by the first's ratio; resampling uses the product of
    #: both ratios (docs/results.md, "Two refiner stages")
    inputs: Literal["partons", "jets", "partons_then_jets"] = "partons"
    #: the classifier's validation events (early stopping): "events" holds out whole parton
    #: events, all their detector realisations and samples; "rows" single rows, of which
    #: most share their parton truth with a training row of another realisation
    #: (docs/results.md, "The coverage estimator, the refiner's validation split, and two stages")
    validation: Literal["events", "rows"] = "events"


class CINNModel(Strict):
    blocks: Annotated[int, Field(ge=1, le=64)] = 12
    subnet_layers: Annotated[int, Field(ge=1, le=8)] = 2
    subnet_width: Annotated[int, Field(ge=4, le=4096)] = 256
    condition_layers: Annotated[int, Field(ge=1, le=12)] = 3
    condition_width: Annotated[int, Field(ge=4, le=4096)] = 256
    condition_dim: Annotated[int, Field(ge=1, le=1024)] = 64
    clamp: PositiveFloat = 2.0
    #: the coupling blocks: FrEIA AllInOneBlocks (affine, the paper's) or rational-quadratic
    #: spline couplings, each followed by a random permutation
    coupling: Literal["affine", "spline"] = "affine"
    #: spline pieces and the interval [−bound, bound] of the standardised coordinates
    #: that the splines cover (identity outside); only with coupling: spline
    spline_bins: Annotated[int, Field(ge=2, le=128)] = 10
    spline_bound: Annotated[float, Field(gt=0.0, le=50.0)] = 5.0
    #: decay coordinates of every jet pair in the condition, not only of the leading
    #: pair and the pair closest to m_W (with ISR jets the W is any of them)
    pair_features: bool = False
    #: how the condition meets the ambiguity of which jets are the W's: "candidate",
    #: one reference pair (the pair of jets closest to m_W) for every event; or
    #: "classifier", a classifier over the pairs of jet slots gives p(k | detector),
    #: and the cINN, given pair k (one-hot and its decay coordinates), learns the
    #: partons with pair k's decay axis as reference; training labels k by the pair
    #: of jets nearest the quarks in ΔR (models/cinn.py, pairing_labels).
    #: Implies pair_features
    pairing: Literal["candidate", "classifier"] = "candidate"
    #: the pairing classifier: hidden layers and width; it is fitted alone before the
    #: cINN, for pairing_epochs epochs with dropout pairing_dropout, keeping the epoch
    #: with the lowest validation cross-entropy
    pairing_layers: Annotated[int, Field(ge=1, le=8)] = 2
    pairing_width: Annotated[int, Field(ge=4, le=4096)] = 256
    pairing_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.3
    pairing_epochs: Annotated[int, Field(ge=1, le=1000)] = 12
    #: with pairing: classifier, a second discrete label beside the W hypothesis: where
    #: the truth's quarks lie. "forward": a quark beyond |η| = 2.5 or not; "forward_soft":
    #: also a central quark below pT = 25 GeV (the jet acceptance). The classifier gives
    #: p(hypothesis, region | detector); the cINN, told the region, learns the posterior
    #: on that region (a quark that made no jet is forward or soft: two disjoint
    #: regions, models/cinn.py, quark_regions)
    quark_regions: Literal["none", "forward", "forward_soft"] = "none"
    #: the W decay azimuth as an interval [−π, π) or as a point on the plane
    #: (cos φ, sin φ), which has no seam for posteriors with modes at 0 and π
    azimuth: Literal["interval", "plane"] = "plane"
    #: the W decay axis: the more energetic quark's direction (cos θ ≥ 0, folded at
    #: balanced decays) or that of the quark nearer the jets' decay axis (no fold)
    quark_label: Literal["energy", "jet"] = "jet"
    #: the leptons as two momenta (log pT, η, Δφ each) or as the Z system (m_ℓℓ, y,
    #: pT, φ) and the ℓ⁻'s decay angles: m_ℓℓ then is a coordinate and keeps the Z peak
    leptons: Literal["momenta", "system"] = "system"
    #: the coordinate of the W's and the Z's decay cos θ: atanh cos θ (exponential
    #: tails) or Φ⁻¹((1 + cos θ)/2) (Gaussian tails, as the flow's base density)
    decay_angle: Literal["atanh", "probit"] = "atanh"
    #: the azimuth from which the Z's (and so the W's: pT balance) is measured: the
    #: lepton pair's, or that of p_ℓℓ − p_jj of the W candidate (each hypothesis's
    #: pair), which the ISR recoil moves less
    z_azimuth: Literal["leptons", "balance"] = "leptons"
    #: the W's quarks: through the W's decay (m_jj, rapidity, decay angles; its pT is
    #: the Z's, by balance), or measured from the two jets of the W hypothesis (the
    #: quark nearer the harder jet: log pT ratio, Δη, Δφ; the other: Δη, Δφ; and
    #: m_jj), the Z's pT then following from the W's (needs leptons = system)
    w_coordinates: Literal["decay", "jets"] = "decay"
    #: which boson's pT and azimuth are coordinates: the Z's (measured from the lepton
    #: pair; the W's follow by balance) or the W's (measured from the W hypothesis's jet
    #: pair; the Z's follow); "w" needs leptons = system and w_coordinates = decay
    system_pt: Literal["z", "w"] = "z"
    #: decay per step of a moving average of the cINN's weights that then unfolds
    #: (0: the last iterate)
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    #: train this many cINNs and unfold with the mixture of their posteriors: member k
    #: (k > 0) starts, is batched and gets its data.resmear detector realisations from the
    #: seed card.seed + 7919·k, on the same events (evaluation.ensemble_refine says how the
    #: mixture is refined); model.pt then holds every member and the mixture's refiner
    ensemble: Annotated[int, Field(ge=1, le=16)] = 1
    mmd: MMDSection = MMDSection()
    refine: RefineSection = RefineSection()


class UnfoldEvaluation(Strict):
    samples_per_event: PositiveInt = 100
    test_events: Optional[PositiveInt] = None
    batch_size: PositiveInt = 100_000
    ibu_iterations: PositiveInt = 4
    bins: Annotated[int, Field(ge=4, le=100)] = 30
    #: bootstrap replicas of the test set for the statistical errors of the cINN's and
    #: IBU's χ²/ndf to truth and of their difference (0: none; 1 is refused)
    bootstrap: Annotated[int, Field(ge=0, le=10_000)] = 100
    #: an ensemble (``unfold --model A --model B …``): "members", each member's samples
    #: resampled by its own refiner; or "mixture", the members' samples before their
    #: refiners resampled by one classifier between truth and the mixture, fitted on
    #: model.refine.independent_events newly simulated events (sized by model.refine)
    ensemble_refine: Literal["members", "mixture"] = "members"
    #: with a refiner: draw this many times samples_per_event from the cINN (or the
    #: ensemble) and let the refiner resample them down to samples_per_event, so that a
    #: strongly varying ratio still leaves many distinct samples per event (1: as many as kept)
    refine_oversample: Annotated[int, Field(ge=1, le=64)] = 1
    #: ``unfold --model … --input FILE`` unfolds the input this many events at a time and
    #: keeps each finished chunk in RUN/chunks/, so an interrupted run continued with
    #: ``--resume`` redoes only the unfinished chunks (without truth in the input, memory
    #: holds one chunk's samples at a time)
    chunk_events: PositiveInt = 50_000
    #: false: no plots (PDF, PNG); report.json keeps every figure. A run with four
    #: channels draws 56 (58 with IBU), about half a second each on a CPU core
    #: (timing.plots_s in the report; docs/results.md, "Throughput")
    plots: bool = True

    @model_validator(mode="after")
    def _bootstrap_replicas(self):
        if self.bootstrap == 1:
            raise ValueError("bootstrap = 1 gives no spread: use 0 (no bootstrap) or at least 2 replicas")
        return self


class UnfoldCard(CommonCard):
    job: Literal["unfold"]
    data: UnfoldData = UnfoldData()
    model: CINNModel = CINNModel()
    evaluation: UnfoldEvaluation = UnfoldEvaluation()

    @model_validator(mode="after")
    def _pairing_needs_validation(self):
        if self.model.pairing == "classifier" and self.training.validation_fraction == 0:
            raise ValueError("model.pairing = classifier keeps the classifier's epoch with the lowest validation cross-entropy, so it needs training.validation_fraction > 0")
        if self.model.quark_regions != "none" and self.model.pairing != "classifier":
            raise ValueError(f"model.quark_regions = {self.model.quark_regions!r} is a label of the pairing classifier: it needs model.pairing = classifier")
        if self.model.refine.independent_events and self.data.source != "pythia":
            raise ValueError(f"model.refine.independent_events simulates events for the refiner, so it needs data.source = pythia, not {self.data.source!r}")
        if self.evaluation.refine_oversample > 1 and self.model.refine.method == "none":
            raise ValueError(f"evaluation.refine_oversample = {self.evaluation.refine_oversample} draws samples for the refiner to resample: "
                             "set model.refine.method = classifier, or refine_oversample = 1")
        if self.model.refine.independent_events and self.model.refine.method == "none":
            raise ValueError("model.refine.independent_events are events for the refiner: set model.refine.method = classifier, or independent_events = 0")
        if self.model.ensemble > 1 and self.evaluation.ensemble_refine == "mixture" and self.model.refine.method == "none":
            raise ValueError(f"model.ensemble = {self.model.ensemble} with evaluation.ensemble_refine = mixture refines the members' mixture by a classifier: "
                             "set model.refine.method = classifier, or evaluation.ensemble_refine = members")
        if self.model.w_coordinates == "jets":
            if self.model.leptons != "system":
                raise ValueError(f"model.w_coordinates = jets takes the Z's pT from the W's: it needs model.leptons = system, not {self.model.leptons!r}")
            if self.model.z_azimuth != "leptons":
                raise ValueError("model.w_coordinates = jets takes the Z's azimuth from the W's: model.z_azimuth has nothing to set, leave it at 'leptons'")
            if self.model.mmd.weight > 0:
                raise ValueError("model.w_coordinates = jets makes m_jj a coordinate of its own: set model.mmd.weight = 0")
        if self.model.system_pt == "w":
            if self.model.leptons != "system" or self.model.w_coordinates != "decay":
                raise ValueError(f"model.system_pt = w measures the W's pT from its jets and lets the Z's follow: it needs model.leptons = system and "
                                 f"model.w_coordinates = decay, not {self.model.leptons!r} and {self.model.w_coordinates!r}")
            if self.model.z_azimuth != "leptons":
                raise ValueError("model.system_pt = w takes the Z's azimuth from the W's: model.z_azimuth has nothing to set, leave it at 'leptons'")
            if self.model.mmd.weight > 0:
                raise ValueError("model.system_pt = w: the m_jj MMD term needs the W's pT from the leptons; set model.mmd.weight = 0")
        if self.model.z_azimuth != "leptons" and self.model.leptons != "system":
            raise ValueError(f"model.z_azimuth = {self.model.z_azimuth!r} is the reference of the Z system's azimuth: it needs model.leptons = system, not {self.model.leptons!r}")
        return self


# ------------------------------------------------------------------ unweight
class UnweightData(Strict):
    source: Literal["generator", "lhe"] = "generator"
    files: list[str] = []
    n_events: PositiveInt = 1_000_000
    n_truth_events: PositiveInt = 4_000_000
    m_min: PositiveFloat = 50.0
    m_max: Optional[PositiveFloat] = None
    mapping: Literal["flat", "tau_y", "breit_wigner", "multichannel"] = "flat"
    scale: Literal["mll", "fixed"] = "mll"
    fixed_scale: PositiveFloat = 91.188
    lepton: Literal[11, 13] = 13
    batch_size: PositiveInt = 1_000_000

    @model_validator(mode="after")
    def _consistent(self):
        if self.m_max is not None and self.m_max <= self.m_min:
            raise ValueError(f"data.m_max = {self.m_max} must exceed data.m_min = {self.m_min}")
        _require_files(self, "generator")
        return self


class UnweightModel(Strict):
    method: Literal["gan", "flow", "flow-exact"] = "flow-exact"
    layers: Annotated[int, Field(ge=1, le=16)] = 4
    width: Annotated[int, Field(ge=4, le=4096)] = 128
    blocks: Annotated[int, Field(ge=1, le=32)] = 6
    bins: Annotated[int, Field(ge=2, le=128)] = 16
    latent_dim: Annotated[int, Field(ge=1, le=256)] = 8
    #: weight γ of the GAN discriminator's R1 gradient penalty ½γ⟨|∇ₓ logit D|²⟩ (method gan)
    gradient_penalty: NonNegFloat = 1.0
    #: the GAN discriminator's learning rate in units of the generator's (method gan)
    discriminator_lr_factor: PositiveFloat = 1.0
    #: decay per step of the moving average of the GAN generator's weights that samples
    #: the events (0: the last iterate; method gan)
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    #: the network's rapidity coordinate: y_ℓℓ itself, or "bounded", Φ⁻¹((1 + y/y_max)/2)
    #: with y_max = ln(√s/m_ℓℓ), whose every value is inside the beams
    rapidity: Literal["y", "bounded"] = "y"
    #: the GAN generator: "mlp" (noise → events) or "residual" (the first three noise
    #: coordinates plus a learned correction: it starts as the analytic model behind
    #: the preprocessing, tails included; method gan, latent_dim ≥ 3)
    generator: Literal["mlp", "residual"] = "mlp"
    #: the networks' last preprocessing step: "standard" (weighted mean 0, variance 1 per
    #: coordinate) or "quantile" (each coordinate made standard normal through the
    #: weighted training sample's quantiles: a residual GAN starts with its marginals)
    marginals: Literal["standard", "quantile"] = "standard"
    #: weight of a term in the GAN generator's loss: the distance between the generated
    #: batch's and the weighted true batch's marginal in every network coordinate
    #: (sorted values against weighted quantiles, 1-D Wasserstein-2; method gan; 0: off)
    marginal_weight: NonNegFloat = 0.0
    #: what marginal_weight holds the generated marginals on: "batch", W₂² to the weighted
    #: true batch of the same step, or "input", the Cramér distance to the quantiles of
    #: the whole weighted training input (computed once; free of the batch's noise)
    marginal_target: Literal["batch", "input"] = "batch"
    #: "classifier": after training, a classifier between the weighted training events
    #: and the network's events gives their density ratio r(x); the network's events
    #: are unweighted again by r (arXiv:2009.03796; methods gan and flow)
    refine: Literal["none", "classifier"] = "none"
    #: how the training batches carry the event weights (methods gan and flow): "loss",
    #: batches drawn uniformly and every event's weight in the loss (arXiv:2012.07873,
    #: 2011.13445), or "resample", batches drawn with replacement in proportion to |w|
    #: and only sign(w) in the loss: the same expected loss, but every batch event
    #: counts fully (a batch's effective size is n, not n(Σw)²/(nΣw²))
    batch_weights: Literal["loss", "resample"] = "loss"
    refine_epochs: PositiveInt = 20
    refine_width: Annotated[int, Field(ge=4, le=4096)] = 128
    refine_layers: Annotated[int, Field(ge=1, le=16)] = 3
    #: a network coordinate the residual GAN generator does not correct (method gan):
    #: its noise coordinate passes straight through the quantile map, so the generated
    #: marginal of that coordinate is the weighted input's by construction, and the
    #: network learns the other two given it (any joint distribution is a marginal times
    #: a conditional). Needs generator = residual and marginals = quantile. "none": off
    fixed_coordinate: Literal["none", "m_ll", "y_ll", "cos_theta"] = "none"
    #: train this many networks (methods gan and flow) on the same input, member k
    #: from the seed card.seed + 1000 k, and draw every event from one of them: the
    #: events follow the members' mixture, whose seed-to-seed deviations partly average out
    ensemble: Annotated[int, Field(ge=1, le=16)] = 1
    #: after training, map each generated marginal in the network's coordinates onto the
    #: weighted training input's (monotone quantile mapping, fitted on 4 × 10⁶ generated
    #: events; a fixed coordinate keeps its own): the network keeps the joint structure,
    #: the 1-D marginals become the input's (method gan)
    marginal_calibration: bool = False

    @model_validator(mode="after")
    def _residual_latent(self):
        if self.generator == "residual" and self.latent_dim < 3:
            raise ValueError(f"generator = 'residual' needs latent_dim ≥ 3 (the event dimension), got {self.latent_dim}")
        if self.fixed_coordinate != "none" and (self.method != "gan" or self.generator != "residual" or self.marginals != "quantile"):
            raise ValueError(f"fixed_coordinate = {self.fixed_coordinate!r} needs method = 'gan', generator = 'residual' and marginals = 'quantile' "
                             f"(got method = {self.method!r}, generator = {self.generator!r}, marginals = {self.marginals!r}): "
                             "only behind the quantile map does an uncorrected coordinate have the input's marginal")
        if self.marginal_calibration and self.method != "gan":
            raise ValueError(f"marginal_calibration applies to method = 'gan', got method = {self.method!r}")
        if self.ensemble > 1 and self.method == "flow-exact":
            raise ValueError(f"ensemble = {self.ensemble} applies to method = 'gan' or 'flow'; 'flow-exact' reweights one flow's events by its own density")
        if self.refine != "none" and self.method == "flow-exact":
            raise ValueError("refine = 'classifier' applies to method = 'gan' or 'flow'; 'flow-exact' is already reweighted to the exact cross section")
        return self


class SampleEvaluation(Strict):
    """Histogram binning and the number of equal-probability bins of the qMSE;
    ``plots: false`` leaves the plots out (the report keeps every figure)."""

    bins: Annotated[int, Field(ge=4, le=200)] = 40
    quantiles: Annotated[int, Field(ge=2, le=1000)] = 20
    plots: bool = True


class UnweightEvaluation(SampleEvaluation):
    n_unweighted: PositiveInt = 100_000
    tail_events: PositiveInt = 1_000_000


class UnweightCard(CommonCard):
    job: Literal["unweight"]
    data: UnweightData = UnweightData()
    model: UnweightModel = UnweightModel()
    evaluation: UnweightEvaluation = UnweightEvaluation()


# ------------------------------------------------------------------ generate
class GenerateData(Strict):
    """Training events: Pythia8 parton-level pp → tt̄ → 6 quarks, or LHE files with the
    same final state (t → b W⁺, W → q q̄', with the resonances in the record)."""

    source: Literal["pythia", "lhe"] = "pythia"
    files: list[str] = []
    n_events: PositiveInt = 100_000
    workers: NonNegInt = 0

    @model_validator(mode="after")
    def _files(self):
        _require_files(self, "pythia")
        return self


class GANModel(Strict):
    """Generator and discriminator MLPs (arXiv:1907.03764: 10 × 512) and the MMD term.

    ``mmd_weight`` λ multiplies Σ MMD² over the W and top masses; the kernel widths are
    each resonance's width times ``mmd_width_factors``; the MMD term is off for the first
    ``mmd_start_epoch`` epochs and reaches λ linearly over ``mmd_ramp_epochs``;
    ``discriminator_lr_factor`` scales the discriminator's learning rate against the
    generator's (two time-scale updates); ``ema_decay`` > 0 samples from a moving average
    of the generator's weights; ``ablation`` also trains the same GAN without MMD for
    comparison."""

    layers: Annotated[int, Field(ge=1, le=32)] = 10
    width: Annotated[int, Field(ge=4, le=4096)] = 512
    latent_dim: Annotated[int, Field(ge=1, le=512)] = 18
    #: the generator's coordinates: the paper's quark momenta, (pT, η, φ), (log pT, η, φ),
    #: or "decay": the decay chain with the resonance masses as coordinates (16 numbers)
    representation: Literal["momenta", "ptetaphi", "logpt", "decay"] = "momenta"
    #: axes of the decay representation's angles: the lab's, or helicity axes (along the
    #: top's and the W's flight directions), in which the W polarisation is one angle
    decay_angles: Literal["lab", "helicity"] = "lab"
    #: "standard" (each coordinate standardised) or "quantile" (each made standard normal
    #: through the training data's quantiles: a residual generator starts with every
    #: marginal of the truth)
    marginals: Literal["standard", "quantile"] = "standard"
    #: "mlp" (noise → coordinates) or "residual" (noise plus a learned correction: with
    #: "decay" it starts from Breit–Wigner peaks; needs latent_dim ≥ the coordinates)
    generator: Literal["mlp", "residual"] = "mlp"
    spectral_norm: bool = False
    batch_statistics: bool = False
    discriminator_masses: bool = False
    gradient_penalty: NonNegFloat = 1.0
    mmd_weight: NonNegFloat = 1.0
    mmd_kernel: Literal["breit_wigner", "gaussian"] = "breit_wigner"
    mmd_width_factors: Annotated[list[PositiveFloat], Field(min_length=1, max_length=8)] = [1.0]
    mmd_start_epoch: NonNegFloat = 0.0
    mmd_ramp_epochs: NonNegFloat = 0.0
    discriminator_lr_factor: PositiveFloat = 1.0
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    #: rotate half of the training batches' events and of the output by π about x (the
    #: beams' exchange, an exact symmetry of pp): the output is forward–backward symmetric
    symmetrise: bool = False
    #: weight of a penalty on the distance between the generated and the true batch's
    #: marginals of every coordinate (sorted values, 1-D Wasserstein-2): with quantile
    #: marginals the generator starts on them, and this keeps it there (0: off)
    marginal_weight: NonNegFloat = 0.0
    ablation: bool = True

    @model_validator(mode="after")
    def _residual_latent(self):
        if self.decay_angles != "lab" and self.representation != "decay":
            raise ValueError(f"decay_angles = {self.decay_angles!r} applies to representation = 'decay' only, got {self.representation!r}")
        need = 16 if self.representation == "decay" else 18
        if self.generator == "residual" and self.latent_dim < need:
            raise ValueError(f"generator = 'residual' with representation = {self.representation!r} needs latent_dim ≥ {need}, got {self.latent_dim}")
        return self


class GenerateEvaluation(SampleEvaluation):
    """``n_generated`` events per model for the metrics and the LHE file; the classifier
    test uses up to ``classifier_events`` of each sample; ``shower_events`` of the LHE
    file are showered by Pythia8 as a check (0: no check). ``truth_events`` > 0 compares the
    generated events with that many truth events that training never saw (Pythia8
    with its own seeds, cached; or the LHE files' events after the first
    ``data.n_events``); 0 compares with the training events themselves."""

    n_generated: PositiveInt = 100_000
    truth_events: NonNegInt = 0
    classifier_events: Annotated[int, Field(ge=1000)] = 200_000
    classifier_epochs: PositiveInt = 10
    shower_events: NonNegInt = 500


class GenerateCard(CommonCard):
    job: Literal["generate"]
    data: GenerateData = GenerateData()
    model: GANModel = GANModel()
    evaluation: GenerateEvaluation = GenerateEvaluation()


Card = Annotated[Union[UnfoldCard, UnweightCard, GenerateCard], Field(discriminator="job")]
JOBS = {"unfold": UnfoldCard, "unweight": UnweightCard, "generate": GenerateCard}


# ------------------------------------------------------------------- loading
def _allowed_keys(model: type[BaseModel], path: tuple) -> list[str]:
    """The keys a section accepts, found by walking the schema along ``path``."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        # a section may be optional (Section | None): the section's own model
        candidates = [annotation, *typing.get_args(annotation)]
        current = next((a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}).keys())


def _format_errors(err: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) for p in loc) or "(card)"
        value = e.get("input")
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[:-1])
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            guess = f"; did you mean {hint[0]!r}?" if hint else "."
            lines.append(f"  {path}: unknown key{guess} Allowed keys here: {', '.join(allowed)}")
        elif e["type"] == "missing":
            lines.append(f"  {path}: required, and missing")
        elif e["type"] in ("model_type", "model_attributes_type", "dict_type"):
            keys = _allowed_keys(model, loc)
            shown = json.dumps(value, default=str)
            lines.append(f"  {path} = {shown}: must be a section of keys" + (f" ({', '.join(keys)})" if keys else "")
                         + (f", e.g. {path}.{keys[0]}: ..." if keys else ""))
        elif e["type"] == "value_error" and isinstance(value, dict):
            # a check across the section's keys: its message names them
            lines.append(f"  {path}: {e['msg'].removeprefix('Value error, ')}")
        else:
            shown = json.dumps(value, default=str) if not isinstance(value, dict) else "{...}"
            lines.append(f"  {path} = {shown}: {e['msg']}")
    return f"invalid card {source}:\n" + "\n".join(lines)


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a card dictionary."""
    out = json.loads(json.dumps(raw))
    for item in overrides or []:
        if "=" not in item:
            raise CardError(f"--set {item!r}: expected the form section.key=value")
        key, _, text = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise CardError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise CardError(f"--set {item!r}: value is not valid YAML ({exc})") from None
        node = out
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise CardError(f"--set {item!r}: {'.'.join(parts[: i + 1])} is a value, not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def parse_card(raw: Any, source: str = "<card>"):
    """Validate a card dictionary; raises :class:`CardError` with readable messages."""
    if not isinstance(raw, dict):
        raise CardError(f"invalid card {source}: the top level must be a mapping of sections, got {type(raw).__name__}")
    job = raw.get("job")
    if job not in JOBS:
        raise CardError(f"invalid card {source}:\n  job = {json.dumps(job)}: must be one of {', '.join(JOBS)}")
    model = JOBS[job]
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise CardError(_format_errors(err, model, source)) from None


def load_card(path: str | Path, overrides: list[str] | None = None):
    """Read a YAML card, apply ``--set`` overrides and validate it."""
    path = Path(path)
    if path.is_dir():
        raise CardError(f"card file {path} is a folder; give the card's YAML file, e.g. {path / 'zw.yaml'}")
    if not path.is_file():
        raise CardError(f"card file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise CardError(f"card {path} is not UTF-8 text: byte 0x{exc.object[exc.start]:02x} on line {line} "
                        "(save the file as UTF-8, e.g. iconv -f latin1 -t utf-8)") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise CardError(f"card {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_card(apply_overrides(raw or {}, overrides), str(path))


def card_to_dict(card: BaseModel) -> dict:
    """The resolved card as plain JSON-compatible data."""
    return card.model_dump(mode="json")


def section_hash(*parts: Any) -> str:
    """A stable short hash of card sections (and seeds), for cache keys."""
    text = json.dumps([p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
