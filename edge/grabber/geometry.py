"""Camera and track geometry: what one line-scan camera sees of the track, in millimetres.

One file per camera in ``calibration/`` (``calibration/example-camera.json`` is the template).
The fastener finder (:mod:`edge.grabber.locate`), the crop cutter (:mod:`edge.grabber.crops`)
and the strip generator (:mod:`edge.grabber.stripgen`) all read the same object, so a test strip
and a vehicle frame are described in the same words.

Image conventions:

- A frame is a 2-D grey array ``(lines, pixels)``. A *pixel* runs across the track (``x``), a
  *line* runs along it; line indices increase down the image and with the distance travelled.
- Pixels need not be square: ``mm_per_px`` (across, set by lens and height) and ``mm_per_line``
  (along, set by the encoder) are independent.
- Rails are named ``left``/``right`` looking toward increasing mileage and sides ``field``/
  ``gauge`` (edge.records). ``left_rail_image_side`` says where the track's left lies in the image
  when the vehicle runs toward increasing mileage; running the other way swaps the names.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from edge.config import StrictModel
from edge.records import Direction, Rail, Side

ImageSide = Literal["left", "right"]


class TrackGeometry(StrictModel):
    """Geometry of one camera over the track, plus the few settings the fastener finder needs.

    Known limit: one geometry per camera and run. The scale across the track is taken as
    constant over the image width (a telecentric or distant camera); a strongly wide-angle lens
    whose scale changes towards the image edge needs its frames rectified first.
    """

    camera_id: str = Field("cam0", description="camera this calibration belongs to")
    mm_per_px: float = Field(gt=0, description="across-track size of one pixel, mm")
    mm_per_line: float = Field(gt=0, description="along-track size of one line (encoder), mm")
    rails_in_view: Literal["both", "left", "right"] = Field(
        "both",
        description="both rails, or the one rail a per-rail camera sees with its two sides",
    )
    left_rail_image_side: ImageSide = Field(
        "left",
        description=(
            "image side (left = small x) of the track's left, i.e. of the left rail and of the "
            "left rail's field side, when the vehicle runs toward increasing mileage"
        ),
    )
    track_form: Literal["ballasted", "slab"] = Field(
        "ballasted",
        description=(
            "ballasted (concrete sleepers) or slab (baseplates on a concrete slab); the finder "
            "treats a baseplate as a sleeper, so on slab set sleeper_width_mm, sleeper_tone and "
            "seat_band_mm to the baseplate's width, shade and margin beyond the fasteners"
        ),
    )

    gauge_mm: float = Field(1435.0, gt=0, description="nominal gauge between rail heads, mm")
    rail_head_width_mm: float = Field(72.0, gt=0, description="rail head width, mm")
    rail_foot_width_mm: float = Field(
        150.0, gt=0, description="rail foot width, mm; the rail's visible band from above"
    )
    rail_spacing_tolerance: float = Field(
        0.05,
        ge=0,
        lt=0.5,
        description="accepted relative error of the measured rail centre spacing (both rails)",
    )
    max_rail_tilt_deg: float = Field(
        4.0,
        ge=0,
        le=30,
        description="largest angle of a rail to the image's vertical that is searched, degrees",
    )

    max_sleeper_skew_deg: float = Field(
        3.0,
        ge=0,
        le=30,
        description=(
            "largest angle of a sleeper to the image's rows that is searched, degrees (a yawed "
            "camera skews sleepers; lateral drift of a line-scan camera does not)"
        ),
    )

    sleeper_pitch_mm: float = Field(600.0, gt=0, description="nominal rail seat pitch, mm")
    pitch_tolerance: float = Field(
        0.3,
        ge=0,
        lt=0.9,
        description=(
            "relative shortfall of the pitch still accepted: two rail seats of one rail closer "
            "than (1 - tolerance) * pitch are taken as one"
        ),
    )
    sleeper_width_mm: float = Field(
        240.0,
        gt=0,
        description="along-track width of a sleeper top (ballasted) or a baseplate (slab), mm",
    )
    sleeper_width_tolerance: float = Field(
        0.2,
        ge=0,
        lt=0.9,
        description="relative spread of sleeper (baseplate) widths accepted around the nominal",
    )
    sleeper_tone: Literal["brighter", "darker", "either"] = Field(
        "brighter",
        description=(
            "whether sleepers (ballasted) or baseplates (slab) look brighter or darker than the "
            "ground around them; 'either' finds both but also takes the gaps between sleepers "
            "for seats when they are as wide as a sleeper"
        ),
    )
    seat_band_mm: float = Field(
        250.0,
        gt=0,
        description=(
            "across-track width, on each side beyond the fasteners, of the band in which the "
            "sleeper is measured (ballasted), mm"
        ),
    )
    min_seat_edges: float = Field(
        2.5,
        gt=0,
        description=(
            "smallest strength of a seat's two cross-track edges, in multiples of the typical "
            "along-track gradient of the window, that counts as a rail seat"
        ),
    )
    min_seat_contrast: float = Field(
        0.2,
        gt=0,
        lt=1,
        description=(
            "relative brightness contrast of a sleeper (baseplate) against the ground on both "
            "sides at which its edges count in full; less contrast scales them down"
        ),
    )

    fastener_offset_mm: float = Field(
        100.0, gt=0, description="across-track distance from rail centre to fastener centre, mm"
    )
    fastener_size_mm: tuple[float, float] = Field(
        (80.0, 140.0), description="fastener extent (across, along track), mm"
    )
    crop_mm: tuple[float, float] = Field(
        (260.0, 260.0),
        description="crop size (across, along track), mm; centred on the fastener",
    )
    fill_level: float | None = Field(
        None,
        description=(
            "grey level (8-bit units) at or below which a pixel is no image, e.g. the fill "
            "around a rotated picture; null for a line-scan camera, where dark is dark"
        ),
    )
    analysis_mm: float = Field(
        4.0,
        gt=0,
        description=(
            "pixel size, mm, of the reduced image the finder searches (crops are cut at full "
            "resolution); a finer image costs time and gains little"
        ),
    )

    @model_validator(mode="after")
    def _check_sizes(self) -> TrackGeometry:
        if min(self.crop_mm) <= 0 or min(self.fastener_size_mm) <= 0:
            raise ValueError("crop_mm and fastener_size_mm must be positive")
        if self.crop_mm[0] / 2 <= self.fastener_offset_mm - self.rail_head_width_mm / 2:
            raise ValueError(
                "crop_mm[0] is too narrow: a crop centred on the fastener must reach the rail "
                "head (crop_mm[0] / 2 > fastener_offset_mm - rail_head_width_mm / 2)"
            )
        return self

    # Derived sizes -------------------------------------------------------------------------

    @property
    def rail_spacing_mm(self) -> float:
        """Distance between the two rail centres, mm (gauge plus one head width)."""
        return self.gauge_mm + self.rail_head_width_mm

    def px(self, mm: float) -> float:
        """Across-track millimetres to pixels."""
        return mm / self.mm_per_px

    def lines(self, mm: float) -> float:
        """Along-track millimetres to lines."""
        return mm / self.mm_per_line

    @property
    def crop_size(self) -> tuple[int, int]:
        """Crop ``(width px, height lines)`` at full resolution, each at least 3."""
        return (
            max(3, round(self.px(self.crop_mm[0]))),
            max(3, round(self.lines(self.crop_mm[1]))),
        )

    @property
    def max_rail_slope(self) -> float:
        """Largest rail slope searched, in pixels across per line along."""
        mm_slope = math.tan(math.radians(self.max_rail_tilt_deg))
        return mm_slope * self.mm_per_line / self.mm_per_px

    # Rail and side names -------------------------------------------------------------------

    def rails_left_to_right(self, direction: Direction = "increasing") -> tuple[Rail, ...]:
        """Names of the rails in view, in image order (small x first)."""
        if self.rails_in_view != "both":
            return (self.rails_in_view,)
        track_left_on_image_left = (self.left_rail_image_side == "left") == (
            direction == "increasing"
        )
        return ("left", "right") if track_left_on_image_left else ("right", "left")

    def side_of(
        self, rail: Rail, image_side: ImageSide, direction: Direction = "increasing"
    ) -> Side:
        """Whether the part of ``rail`` on ``image_side`` of it is its field or gauge side."""
        track_left_on_image_left = (self.left_rail_image_side == "left") == (
            direction == "increasing"
        )
        track_left_here = (image_side == "left") == track_left_on_image_left
        # The field side of the left rail is the track's left; of the right rail, its right.
        return "field" if track_left_here == (rail == "left") else "gauge"
