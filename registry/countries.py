"""ISO 3166-1 alpha-2: the codes a country of the registry may have.

The 249 officially assigned codes, as listed by the tz database's ``iso3166.tab`` (current
as of ISO/TC 46 N1108, 2023-04-05), kept here rather than as a dependency: the list moves
once in years and the registry needs only the codes. Reserved and user-assigned codes
(``XK``, ``ZZ``, ``EU``) are not countries. When ISO assigns a code, add it here.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError

# One string split, not a list literal: ruff format would put the 249 codes one per line.
ISO_3166_ALPHA2 = frozenset(
    (  # noqa: SIM905
        "AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL "
        "BM BN BO BQ BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV "
        "CW CX CY CZ DE DJ DK DM DO DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD "
        "GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM HN HR HT HU ID IE IL IM "
        "IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC LI LK "
        "LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW "
        "MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR "
        "PS PT PW PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS "
        "ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY "
        "UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW "
    ).split()
)


def is_country_code(code: str) -> bool:
    return code in ISO_3166_ALPHA2


def validate_country_code(value: str) -> None:
    if not is_country_code(value):
        raise ValidationError(
            f"{value!r} is not an ISO 3166-1 alpha-2 country code.", code="country_code"
        )
