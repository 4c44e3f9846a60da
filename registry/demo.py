"""The demo network: a deterministic model of a national telehealth scheme.

Modelled on Viet Nam's programme: ~1,000 lower-tier hospitals (district health centres, commune
health stations, island and mountain sites, 2 hospitals in Laos and 1 in Cambodia) supported by
26 upper-tier hospitals (8 central, 18 provincial). Provinces, upper-tier hospitals, islands and the
cross-border partners are real (names and approximate coordinates); districts, communes and
lower-tier hospitals are synthetic but plausible.

``network_plan()`` is pure: the same arguments always give the same plan (names, codes,
coordinates, links), because every random choice comes from a ``random.Random`` seeded with a fixed
value and a stream name, never from the global generator. ``demo_seed()`` writes a plan with bulk
inserts and creates the demo accounts (password ``demo``); callers must refuse it in production.
"""

from __future__ import annotations

import functools
import hashlib
import math
import random
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, NamedTuple, TypeVar

from django.conf import settings
from django.contrib.auth.hashers import make_password
from django.contrib.auth.models import Group
from django.db import models, transaction
from tqdm import tqdm

from accounts import authentication
from accounts.models import User
from accounts.roles import Role
from registry.models import (
    AdministrativeArea,
    AreaLevel,
    Country,
    Department,
    Endpoint,
    Facility,
    FacilityIdentifier,
    FacilityRevision,
    Practitioner,
    PractitionerRole,
    Specialty,
    SupportLink,
    Tier,
)
from registry.services import facility_snapshot
from registry.specialties import PRACTICE_SETTING_SPECIALTIES
from registry.text import search_key

SEED = 20200918
# the documented demo password; with DEBUG off seeding is refused and it opens no account
DEMO_PASSWORD = authentication.DEMO_PASSWORD
MOH_FACILITY_CODE_SYSTEM = "https://moh.gov.vn/facility-code"
ENDPOINT_BASE = "http://127.0.0.1:8100/fhir"
DOMESTIC_LINKS_FROM = date(2020, 9, 1)
CROSS_BORDER_LINKS_FROM = date(2024, 1, 1)
BATCH_SIZE = 1000

# Lower-tier hospitals (district, commune and the three partners abroad) per scale. National:
# 26 upper-tier + 13,974 lower-tier = 14,000 facilities, mostly commune health stations.
SCALES: Mapping[str, int] = {"default": 1000, "national": 13_974}

PEDIATRICS = "394537008"

# --- Countries and areas ------------------------------------------------------------------------

COUNTRIES: tuple[tuple[str, str, str], ...] = (
    ("VN", "Viet Nam", "Việt Nam"),
    ("LA", "Lao PDR", "ສປປ ລາວ"),
    ("KH", "Cambodia", "កម្ពុជា"),
)


class Province(NamedTuple):
    code: str  # GSO province code, also the prefix of facility codes
    name: str
    capital: str  # the district-level unit holding the provincial capital
    lat: float
    lon: float
    districts: int  # roughly the real number of district-level units
    highland: bool = False  # mountain province: many lower-tier sites are hard to reach


PROVINCES: tuple[Province, ...] = (
    Province("01", "Hà Nội", "Quận Hoàn Kiếm", 21.0285, 105.8542, 30),
    Province("02", "Hà Giang", "Thành phố Hà Giang", 22.8233, 104.9836, 11, True),
    Province("04", "Cao Bằng", "Thành phố Cao Bằng", 22.6657, 106.2570, 10, True),
    Province("06", "Bắc Kạn", "Thành phố Bắc Kạn", 22.1470, 105.8348, 8, True),
    Province("08", "Tuyên Quang", "Thành phố Tuyên Quang", 21.8236, 105.2140, 7),
    Province("10", "Lào Cai", "Thành phố Lào Cai", 22.4856, 103.9707, 9, True),
    Province("11", "Điện Biên", "Thành phố Điện Biên Phủ", 21.3860, 103.0230, 10, True),
    Province("12", "Lai Châu", "Thành phố Lai Châu", 22.3964, 103.4582, 8, True),
    Province("14", "Sơn La", "Thành phố Sơn La", 21.3270, 103.9141, 12, True),
    Province("15", "Yên Bái", "Thành phố Yên Bái", 21.7229, 104.9113, 9, True),
    Province("17", "Hòa Bình", "Thành phố Hòa Bình", 20.8133, 105.3383, 10, True),
    Province("19", "Thái Nguyên", "Thành phố Thái Nguyên", 21.5942, 105.8482, 9),
    Province("20", "Lạng Sơn", "Thành phố Lạng Sơn", 21.8537, 106.7610, 11, True),
    Province("22", "Quảng Ninh", "Thành phố Hạ Long", 20.9510, 107.0800, 13),
    Province("24", "Bắc Giang", "Thành phố Bắc Giang", 21.2731, 106.1946, 10),
    Province("25", "Phú Thọ", "Thành phố Việt Trì", 21.3227, 105.4019, 13),
    Province("26", "Vĩnh Phúc", "Thành phố Vĩnh Yên", 21.3089, 105.6049, 9),
    Province("27", "Bắc Ninh", "Thành phố Bắc Ninh", 21.1861, 106.0763, 8),
    Province("30", "Hải Dương", "Thành phố Hải Dương", 20.9373, 106.3146, 12),
    Province("31", "Hải Phòng", "Quận Hồng Bàng", 20.8449, 106.6881, 15),
    Province("33", "Hưng Yên", "Thành phố Hưng Yên", 20.6464, 106.0511, 10),
    Province("34", "Thái Bình", "Thành phố Thái Bình", 20.4463, 106.3366, 8),
    Province("35", "Hà Nam", "Thành phố Phủ Lý", 20.5411, 105.9140, 6),
    Province("36", "Nam Định", "Thành phố Nam Định", 20.4200, 106.1683, 10),
    Province("37", "Ninh Bình", "Thành phố Ninh Bình", 20.2506, 105.9745, 8),
    Province("38", "Thanh Hóa", "Thành phố Thanh Hóa", 19.8067, 105.7852, 26),
    Province("40", "Nghệ An", "Thành phố Vinh", 18.6796, 105.6813, 21),
    Province("42", "Hà Tĩnh", "Thành phố Hà Tĩnh", 18.3428, 105.9057, 13),
    Province("44", "Quảng Bình", "Thành phố Đồng Hới", 17.4689, 106.6223, 8),
    Province("45", "Quảng Trị", "Thành phố Đông Hà", 16.8163, 107.1003, 10),
    Province("46", "Thừa Thiên Huế", "Thành phố Huế", 16.4637, 107.5909, 9),
    Province("48", "Đà Nẵng", "Quận Hải Châu", 16.0544, 108.2022, 8),
    Province("49", "Quảng Nam", "Thành phố Tam Kỳ", 15.5736, 108.4740, 18),
    Province("51", "Quảng Ngãi", "Thành phố Quảng Ngãi", 15.1205, 108.7923, 13),
    Province("52", "Bình Định", "Thành phố Quy Nhơn", 13.7820, 109.2194, 11),
    Province("54", "Phú Yên", "Thành phố Tuy Hòa", 13.0955, 109.3209, 9),
    Province("56", "Khánh Hòa", "Thành phố Nha Trang", 12.2388, 109.1967, 9),
    Province("58", "Ninh Thuận", "Thành phố Phan Rang – Tháp Chàm", 11.5673, 108.9886, 7),  # noqa: RUF001
    Province("60", "Bình Thuận", "Thành phố Phan Thiết", 10.9289, 108.1021, 10),
    Province("62", "Kon Tum", "Thành phố Kon Tum", 14.3498, 108.0005, 10, True),
    Province("64", "Gia Lai", "Thành phố Pleiku", 13.9833, 108.0000, 17, True),
    Province("66", "Đắk Lắk", "Thành phố Buôn Ma Thuột", 12.6667, 108.0500, 15),
    Province("67", "Đắk Nông", "Thành phố Gia Nghĩa", 12.0045, 107.6907, 8, True),
    Province("68", "Lâm Đồng", "Thành phố Đà Lạt", 11.9404, 108.4583, 12),
    Province("70", "Bình Phước", "Thành phố Đồng Xoài", 11.5349, 106.8833, 11),
    Province("72", "Tây Ninh", "Thành phố Tây Ninh", 11.3100, 106.0983, 9),
    Province("74", "Bình Dương", "Thành phố Thủ Dầu Một", 10.9804, 106.6519, 9),
    Province("75", "Đồng Nai", "Thành phố Biên Hòa", 10.9574, 106.8427, 11),
    Province("77", "Bà Rịa – Vũng Tàu", "Thành phố Bà Rịa", 10.4963, 107.1684, 8),  # noqa: RUF001
    Province("79", "Thành phố Hồ Chí Minh", "Quận 1", 10.7769, 106.7009, 22),
    Province("80", "Long An", "Thành phố Tân An", 10.5360, 106.4137, 15),
    Province("82", "Tiền Giang", "Thành phố Mỹ Tho", 10.3600, 106.3600, 11),
    Province("83", "Bến Tre", "Thành phố Bến Tre", 10.2434, 106.3756, 9),
    Province("84", "Trà Vinh", "Thành phố Trà Vinh", 9.9347, 106.3453, 9),
    Province("86", "Vĩnh Long", "Thành phố Vĩnh Long", 10.2537, 105.9722, 8),
    Province("87", "Đồng Tháp", "Thành phố Cao Lãnh", 10.4550, 105.6330, 12),
    Province("89", "An Giang", "Thành phố Long Xuyên", 10.3864, 105.4352, 11),
    Province("91", "Kiên Giang", "Thành phố Rạch Giá", 10.0125, 105.0809, 15),
    Province("92", "Cần Thơ", "Quận Ninh Kiều", 10.0452, 105.7469, 9),
    Province("93", "Hậu Giang", "Thành phố Vị Thanh", 9.7845, 105.4701, 8),
    Province("94", "Sóc Trăng", "Thành phố Sóc Trăng", 9.6025, 105.9739, 11),
    Province("95", "Bạc Liêu", "Thành phố Bạc Liêu", 9.2940, 105.7278, 7),
    Province("96", "Cà Mau", "Thành phố Cà Mau", 9.1769, 105.1524, 9),
)

# Centrally-run cities: most of their districts are urban (quận, phường).
CITY_PROVINCES = frozenset({"01", "31", "48", "79", "92"})

# Names keep the en dash of the official spelling (RUF001 is silenced where they contain one).

# Real district-level units that upper-tier hospitals stand in: (province, name, lat, lon).
NAMED_DISTRICTS: tuple[tuple[str, str, float, float], ...] = (
    ("01", "Quận Đống Đa", 21.0181, 105.8290),
    ("01", "Huyện Đông Anh", 21.1370, 105.8490),
    ("31", "Quận Lê Chân", 20.8470, 106.6800),
    ("79", "Quận 5", 10.7540, 106.6630),
)


class Island(NamedTuple):
    key: str
    province: str
    district: str
    hospital: str
    lat: float
    lon: float


# Offshore island districts and their health centres (real places, approximate coordinates).
ISLAND_DISTRICTS: tuple[Island, ...] = (
    Island(
        "con-dao",
        "77",
        "Huyện Côn Đảo",
        "Trung tâm Y tế Quân–Dân y Côn Đảo",  # noqa: RUF001
        8.6826,
        106.6083,
    ),
    Island(
        "truong-sa", "56", "Huyện Trường Sa", "Trung tâm Y tế huyện Trường Sa", 8.6447, 111.9208
    ),
    Island(
        "phu-quoc",
        "91",
        "Thành phố Phú Quốc",
        "Trung tâm Y tế thành phố Phú Quốc",
        10.2170,
        103.9590,
    ),
    Island("kien-hai", "91", "Huyện Kiên Hải", "Trung tâm Y tế huyện Kiên Hải", 9.9710, 104.8400),
    Island(
        "bach-long-vi",
        "31",
        "Huyện Bạch Long Vĩ",
        "Trung tâm Y tế huyện Bạch Long Vĩ",
        20.1336,
        107.7290,
    ),
    Island("ly-son", "51", "Huyện Lý Sơn", "Trung tâm Y tế huyện Lý Sơn", 15.3800, 109.1150),
    Island("co-to", "22", "Huyện Cô Tô", "Trung tâm Y tế huyện Cô Tô", 20.9790, 107.7620),
    Island("phu-quy", "60", "Huyện Phú Quý", "Trung tâm Y tế huyện Phú Quý", 10.5200, 108.9380),
    Island("con-co", "45", "Huyện Cồn Cỏ", "Trung tâm Y tế huyện Cồn Cỏ", 17.1590, 107.3410),
)

# Island communes with their own health station: (key, island district key, commune, lat, lon).
ISLAND_COMMUNES: tuple[tuple[str, str, str, float, float], ...] = (
    ("tho-chau", "phu-quoc", "Xã Thổ Châu", 9.2960, 103.4820),
)

# Syllables of Sino-Vietnamese place names; pairs of them name the synthetic districts/communes.
PLACE_FIRST: tuple[str, ...] = (
    "An", "Bình", "Tân", "Phú", "Hòa", "Yên", "Vĩnh", "Thạch", "Thanh", "Long",
    "Hưng", "Quảng", "Mỹ", "Đức", "Thuận", "Kim", "Cẩm", "Gia", "Xuân", "Hoài",
    "Hiệp", "Minh", "Ngọc", "Phước", "Tam", "Thái", "Trung", "Văn", "Lương", "Đông",
)  # fmt: skip
PLACE_SECOND: tuple[str, ...] = (
    "An", "Bình", "Phú", "Hòa", "Lộc", "Sơn", "Hải", "Lạc", "Thọ", "Thủy",
    "Thành", "Lâm", "Giang", "Điền", "Phong", "Khánh", "Lợi", "Thắng", "Tiến", "Trạch",
    "Xương", "Hưng", "Định", "Nghĩa", "Thịnh", "Hà", "Linh", "Tân", "Lập", "Mỹ",
)  # fmt: skip
PLACE_NAMES: tuple[str, ...] = tuple(
    f"{first} {second}" for first in PLACE_FIRST for second in PLACE_SECOND if first != second
)

FAMILY_NAMES: tuple[str, ...] = (
    "Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Huỳnh", "Phan", "Vũ",
    "Võ", "Đặng", "Bùi", "Đỗ", "Hồ", "Ngô", "Dương", "Lý",
)  # fmt: skip
GIVEN_NAMES: tuple[str, ...] = (
    "Văn An", "Thị Bình", "Minh Châu", "Quốc Dũng", "Thu Hà", "Thanh Hương", "Đức Minh",
    "Ngọc Lan", "Hoàng Long", "Thị Mai", "Văn Nam", "Hải Yến", "Minh Tuấn", "Thị Thảo",
    "Quang Huy", "Bảo Ngọc", "Anh Tú", "Thu Trang", "Xuân Phúc", "Kim Oanh",
)  # fmt: skip

# --- Upper tier -----------------------------------------------------------------------------------

DEPARTMENT_NAMES: Mapping[str, str] = {
    "394537008": "Khoa Nhi",
    "394539006": "Khoa Ngoại Nhi",
    "394588006": "Khoa Tâm bệnh Nhi",
    "394580004": "Khoa Di truyền và Sinh học phân tử",
    "394591006": "Khoa Thần kinh",
    "394579002": "Khoa Tim mạch",
    "394802001": "Khoa Nội tổng hợp",
    "394609007": "Khoa Ngoại tổng hợp",
    "394585009": "Khoa Phụ sản",
    "394586005": "Khoa Phụ khoa",
    "394582007": "Khoa Da liễu",
    "394584008": "Khoa Tiêu hóa",
    "394589003": "Khoa Thận",
    "394594003": "Khoa Mắt",
    "394583002": "Khoa Nội tiết",
    "394807007": "Khoa Truyền nhiễm",
    "394587001": "Khoa Tâm thần",
    "394592004": "Khoa Xạ trị",
    "394593009": "Khoa Nội Ung bướu",
    "394595002": "Khoa Giải phẫu bệnh",
    "394604002": "Khoa Tai Mũi Họng",
    "394610002": "Khoa Phẫu thuật Thần kinh",
    "394611003": "Khoa Phẫu thuật Tạo hình",
    "394801008": "Khoa Chấn thương Chỉnh hình",
    "394612005": "Khoa Tiết niệu",
    "394576009": "Khoa Cấp cứu",
    "394577000": "Khoa Gây mê Hồi sức",
    "394590007": "Khoa Hô hấp",
    "394649004": "Khoa Y học hạt nhân",
    "394803006": "Khoa Huyết học",
    "394805004": "Khoa Dị ứng – Miễn dịch lâm sàng",  # noqa: RUF001
    "394806003": "Khoa Chăm sóc giảm nhẹ",
    "394811001": "Khoa Lão khoa",
    "394914008": "Khoa Chẩn đoán hình ảnh",
    "408463005": "Khoa Phẫu thuật Mạch máu",
    "408471009": "Khoa Phẫu thuật Tim mạch – Lồng ngực",  # noqa: RUF001
    "408478003": "Khoa Hồi sức tích cực",
    "408448007": "Khoa Bệnh nhiệt đới",
    "408454008": "Khoa Vi sinh",
}


class Hub(NamedTuple):
    key: str
    name: str
    province: str
    district: str  # the province's capital or one of NAMED_DISTRICTS
    tier: int
    facility_type: str
    lat: float
    lon: float
    beds: int
    languages: tuple[str, ...]
    specialties: tuple[str, ...]  # empty: the provincial mix (PROVINCIAL_CORE + a sample)


# General hospitals are also the regional hubs (north, centre, south).
GENERAL = "central general hospital"
SPECIALISED = "central specialised hospital"
PROVINCIAL = "provincial general hospital"

CENTRAL_HOSPITALS: tuple[Hub, ...] = (
    Hub(
        "bach-mai", "Bệnh viện Bạch Mai", "01", "Quận Đống Đa", 1, GENERAL,
        21.0011, 105.8412, 3200, ("vi", "en", "lo"),
        ("394802001", "394579002", "394591006", "394584008", "394589003", "394583002",
         "394807007", "394803006", "408478003", "394590007", "394582007", "394587001",
         "394914008", "394649004", "394805004", "394811001", "394576009"),
    ),
    Hub(
        "viet-duc", "Bệnh viện Hữu nghị Việt Đức", "01", "Quận Hoàn Kiếm", 1, SPECIALISED,
        21.0283, 105.8468, 1500, ("vi", "en"),
        ("394609007", "394610002", "394801008", "394612005", "408471009", "394611003",
         "394576009", "394577000", "408463005", "394914008"),
    ),
    Hub(
        "nhi-tw", "Bệnh viện Nhi Trung ương", "01", "Quận Đống Đa", 1, SPECIALISED,
        21.0253, 105.8075, 1500, ("vi", "en", "lo"),
        (PEDIATRICS, "394539006", "394588006", "394580004", "408478003", "394807007"),
    ),
    Hub(
        "phu-san-tw", "Bệnh viện Phụ sản Trung ương", "01", "Quận Hoàn Kiếm", 1, SPECIALISED,
        21.0252, 105.8520, 1000, ("vi", "en"),
        ("394585009", "394586005"),
    ),
    Hub(
        "k", "Bệnh viện K", "01", "Quận Hoàn Kiếm", 1, SPECIALISED,
        21.0265, 105.8440, 2000, ("vi", "en"),
        ("394592004", "394593009", "394595002", "394649004", "394806003"),
    ),
    Hub(
        "nhiet-doi-tw", "Bệnh viện Bệnh Nhiệt đới Trung ương", "01", "Huyện Đông Anh", 1,
        SPECIALISED, 21.1393, 105.7783, 700, ("vi", "en"),
        ("394807007", "408448007", "408454008", "408478003"),
    ),
    Hub(
        "hue", "Bệnh viện Trung ương Huế", "46", "Thành phố Huế", 1, GENERAL,
        16.4618, 107.5876, 3000, ("vi", "en"),
        ("394802001", "394579002", "394591006", "394609007", PEDIATRICS, "394585009",
         "394593009", "394807007", "408478003", "394801008", "394576009", "394594003"),
    ),
    Hub(
        "cho-ray", "Bệnh viện Chợ Rẫy", "79", "Quận 5", 1, GENERAL,
        10.7579, 106.6595, 2800, ("vi", "en", "km"),
        ("394802001", "394579002", "394591006", "394609007", "394610002", "394801008",
         "394584008", "394589003", "394807007", "408478003", "394593009", "394576009",
         "394612005"),
    ),
)  # fmt: skip


def _provincial(
    key: str, name: str, province: str, lat: float, lon: float, beds: int, *languages: str
) -> Hub:
    capital = next(p.capital for p in PROVINCES if p.code == province)
    return Hub(key, name, province, capital, 2, PROVINCIAL, lat, lon, beds, ("vi", *languages), ())


PROVINCIAL_HOSPITALS: tuple[Hub, ...] = (
    _provincial("ha-giang", "Bệnh viện Đa khoa tỉnh Hà Giang", "02", 22.8180, 104.9780, 600),
    _provincial("lao-cai", "Bệnh viện Đa khoa tỉnh Lào Cai", "10", 22.4300, 104.0010, 700),
    _provincial("dien-bien", "Bệnh viện Đa khoa tỉnh Điện Biên", "11", 21.3930, 103.0200, 600),
    _provincial("son-la", "Bệnh viện Đa khoa tỉnh Sơn La", "14", 21.3250, 103.9170, 800),
    _provincial("quang-ninh", "Bệnh viện Đa khoa tỉnh Quảng Ninh", "22", 20.9560, 107.0720, 1000),
    _provincial("viet-tiep", "Bệnh viện Hữu nghị Việt Tiệp", "31", 20.8560, 106.6830, 1700),
    _provincial(
        "thanh-hoa", "Bệnh viện Đa khoa tỉnh Thanh Hóa", "38", 19.8070, 105.7760, 1500, "lo"
    ),
    _provincial(
        "nghe-an", "Bệnh viện Hữu nghị Đa khoa Nghệ An", "40", 18.7030, 105.6570, 1500, "lo"
    ),
    _provincial("quang-tri", "Bệnh viện Đa khoa tỉnh Quảng Trị", "45", 16.8170, 107.0970, 600),
    _provincial("da-nang", "Bệnh viện Đà Nẵng", "48", 16.0680, 108.2200, 1500),
    _provincial("quang-ngai", "Bệnh viện Đa khoa tỉnh Quảng Ngãi", "51", 15.1170, 108.8030, 1000),
    _provincial("khanh-hoa", "Bệnh viện Đa khoa tỉnh Khánh Hòa", "56", 12.2470, 109.1920, 1200),
    _provincial(
        "tay-nguyen", "Bệnh viện Đa khoa vùng Tây Nguyên", "66", 12.6800, 108.0560, 1100, "km"
    ),
    _provincial("ba-ria", "Bệnh viện Bà Rịa", "77", 10.5000, 107.1790, 800),
    _provincial("can-tho", "Bệnh viện Đa khoa thành phố Cần Thơ", "92", 10.0370, 105.7800, 1000),
    _provincial("an-giang", "Bệnh viện Đa khoa Trung tâm An Giang", "89", 10.3790, 105.4400, 1000),
    _provincial("kien-giang", "Bệnh viện Đa khoa tỉnh Kiên Giang", "91", 10.0130, 105.0870, 1000),
    _provincial("ca-mau", "Bệnh viện Đa khoa tỉnh Cà Mau", "96", 9.1750, 105.1610, 1000),
)

HUBS: tuple[Hub, ...] = (*CENTRAL_HOSPITALS, *PROVINCIAL_HOSPITALS)

# Every provincial hospital offers these, plus a deterministic sample of the optional ones.
PROVINCIAL_CORE: tuple[str, ...] = ("394802001", PEDIATRICS, "394585009", "394609007", "394576009")
PROVINCIAL_OPTIONAL: tuple[str, ...] = (
    "394579002", "394801008", "394807007", "394914008", "394594003", "394604002", "408478003",
)  # fmt: skip

REGIONAL_HUBS = ("bach-mai", "hue", "cho-ray")  # north, centre, south
SPECIALIST_HUBS = ("viet-duc", "nhi-tw", "phu-san-tw", "k", "nhiet-doi-tw")

# Links the demo story relies on: the island referrer reaches the children's hospital.
FIXED_SPECIALIST_LINKS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("nhi-tw", "con-dao", (PEDIATRICS, "394539006")),
)

# --- Partners across the border -----------------------------------------------------------------


class Partner(NamedTuple):
    key: str
    country: str
    province: str  # ISO 3166-2 subdivision suffix
    province_name: str
    province_local: str
    district: str
    district_local: str
    name: str
    name_local: str
    lat: float
    lon: float
    beds: int
    languages: tuple[str, ...]
    fhir_version: str | None


PARTNERS: tuple[Partner, ...] = (
    Partner(
        "houaphanh", "LA", "HO", "Houaphanh", "ຫົວພັນ", "Xamneua", "ຊຳເໜືອ",
        "Houaphanh Provincial Hospital", "ໂຮງໝໍແຂວງຫົວພັນ", 20.4170, 104.0470, 200, ("lo",), "4.0",
    ),
    Partner(
        "xiengkhouang", "LA", "XI", "Xiengkhouang", "ຊຽງຂວາງ", "Pek", "ແປກ",
        "Xiengkhouang Provincial Hospital", "ໂຮງໝໍແຂວງຊຽງຂວາງ", 19.4560, 103.1970, 200, ("lo",),
        None,
    ),
    Partner(
        "ratanakiri", "KH", "16", "Ratanakiri", "រតនគិរី", "Banlung", "បានលុង",
        "Ratanakiri Provincial Referral Hospital", "មន្ទីរពេទ្យបង្អែកខេត្តរតនគិរី",
        13.7390, 106.9860, 160, ("km",), None,
    ),
)  # fmt: skip

# (hub, spoke, specialties (empty = all), agreement, identifiable data allowed)
CROSS_BORDER_LINKS: tuple[tuple[str, str, tuple[str, ...], str, bool], ...] = (
    ("thanh-hoa", "houaphanh", (), "VN-LA-DSA-2024-01", True),
    ("bach-mai", "houaphanh", ("394802001", "394579002", "394807007"), "VN-LA-DSA-2024-01", True),
    ("nhi-tw", "houaphanh", (PEDIATRICS,), "VN-LA-DSA-2024-01", True),
    ("nghe-an", "xiengkhouang", (), "VN-LA-DSA-2024-02", False),
    ("bach-mai", "xiengkhouang", ("394802001", "394591006"), "VN-LA-DSA-2024-02", False),
    ("tay-nguyen", "ratanakiri", (), "VN-KH-DSA-2024-01", False),
    ("cho-ray", "ratanakiri", ("394802001", "394609007"), "VN-KH-DSA-2024-01", False),
    ("nhiet-doi-tw", "ratanakiri", ("408448007",), "VN-KH-DSA-2024-01", False),
)

# --- Demo accounts --------------------------------------------------------------------------------


class DemoAccount(NamedTuple):
    username: str
    role: Role
    facility: str | None  # a facility key of the plan
    department: str | None  # specialty code of a department at that facility
    given_name: str
    family_name: str
    practitioner_role: str | None  # PractitionerRole.Code; None: not a clinician
    languages: tuple[str, ...] = ("vi",)


DEMO_ACCOUNTS: tuple[DemoAccount, ...] = (
    DemoAccount("demo-referrer", Role.REFERRER, "con-dao", None, "Văn Hải", "Trần", "doctor"),
    DemoAccount(
        "demo-referrer-lao",
        Role.REFERRER,
        "houaphanh",
        None,
        "Souksavanh",
        "Phommachanh",
        "doctor",
        ("lo",),
    ),
    DemoAccount(
        "demo-consultant", Role.CONSULTANT, "nhi-tw", PEDIATRICS, "Thu Hà", "Nguyễn", "consultant"
    ),
    # Coordinates the children's hospital's paediatrics worklist, so one demo covers the whole
    # loop: island referrer -> coordinator -> consultant.
    DemoAccount(
        "demo-coordinator", Role.COORDINATOR, "nhi-tw", PEDIATRICS, "Minh Châu", "Lê", "coordinator"
    ),
    DemoAccount("demo-ministry", Role.MINISTRY, None, None, "Quốc Huy", "Phạm", None),
    DemoAccount("demo-steward", Role.REGISTRY_STEWARD, None, None, "Ngọc Lan", "Đỗ", None),
    DemoAccount("demo-facility-admin", Role.FACILITY_ADMIN, "con-dao", None, "Hải Yến", "Vũ", None),
    # The island hospital's system, working in its paediatric ward too: it sees the
    # counter-referrals the children's hospital addresses there.
    DemoAccount("demo-member-system", Role.MEMBER_SYSTEM, "con-dao", PEDIATRICS, "", "", None),
    # The children's hospital's system: the consultant side of the FHIR examples (docs/fhir.md).
    DemoAccount("demo-member-system-hub", Role.MEMBER_SYSTEM, "nhi-tw", PEDIATRICS, "", "", None),
)
# The demo referrer's facility (an island district health centre).
REFERRER_KEY = "con-dao"

# The network counts as present when this facility exists (the whole network is written in one
# transaction, so one facility stands for all of it).
MARKER_KEY = REFERRER_KEY

# --- The plan -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AreaPlan:
    country: str
    code: str
    level: int
    name: str
    name_local: str = ""
    parent: str | None = None  # code of the parent area, same country


@dataclass(frozen=True, slots=True)
class FacilityPlan:
    code: str
    name: str
    country: str
    province: str  # area code, level 1
    area: str  # area code, the most specific
    tier: int
    facility_type: str
    latitude: float
    longitude: float
    name_local: str = ""
    languages: tuple[str, ...] = ("vi",)
    beds: int | None = None
    is_remote: bool = False
    parent: str | None = None  # facility code
    moh_code: str | None = None  # value under MOH_FACILITY_CODE_SYSTEM
    fhir_version: str | None = None  # an Endpoint is created when set
    key: str = ""


@dataclass(frozen=True, slots=True)
class DepartmentPlan:
    facility: str
    specialty: str
    name: str
    offers_async: bool
    offers_live: bool
    offers_transfer: bool
    accepting: bool
    daily_capacity: int
    sla_hours: int
    languages: tuple[str, ...]
    consultants: tuple[tuple[str, str, str], ...]  # (family name, given name, licence number)


@dataclass(frozen=True, slots=True)
class LinkPlan:
    hub: str
    spoke: str
    specialties: tuple[str, ...]  # empty = all the hub offers
    valid_from: date
    is_cross_border: bool = False
    agreement_reference: str = ""
    identifiable_data_allowed: bool = True


@dataclass(frozen=True)
class NetworkPlan:
    areas: tuple[AreaPlan, ...]
    facilities: tuple[FacilityPlan, ...]
    departments: tuple[DepartmentPlan, ...]
    links: tuple[LinkPlan, ...]
    keys: Mapping[str, str] = field(default_factory=dict)  # named facility key -> code

    def digest(self) -> str:
        """SHA-256 over (code, name, latitude, longitude) of every facility, by code."""
        return facilities_digest((f.code, f.name, f.latitude, f.longitude) for f in self.facilities)

    def row_count(self) -> int:
        consultants = sum(len(d.consultants) for d in self.departments)
        return (
            len(self.areas)
            + 2 * len(self.facilities)  # the facility and its revision
            + sum(1 for f in self.facilities if f.moh_code)
            + sum(1 for f in self.facilities if f.fhir_version)
            + len(self.departments)
            + 2 * consultants
            + len(self.links)
            + sum(len(link.specialties) for link in self.links)
        )


def facilities_digest(rows: Iterable[tuple[str, str, float | None, float | None]]) -> str:
    lines = sorted(f"{code}|{name}|{lat!r}|{lon!r}" for code, name, lat, lon in rows)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _rng(*stream: str) -> random.Random:
    # One generator per named stream: adding data to one province (or one stage) does not shift
    # the names and coordinates drawn for the others. String seeds hash with SHA-512, so they do
    # not depend on PYTHONHASHSEED.
    return random.Random(":".join((str(SEED), *stream)))  # noqa: S311 - demo data, not secrets


def _near(rng: random.Random, lat: float, lon: float, spread: float) -> tuple[float, float]:
    # Rounded to ~1 m so the stored floats (and the digest) are identical on every backend.
    return (
        round(lat + rng.uniform(-spread, spread), 5),
        round(lon + rng.uniform(-spread, spread), 5),
    )


def _health_centre_name(district: str) -> str:
    # "Huyện Tân Phú" -> "Trung tâm Y tế huyện Tân Phú" (the unit's kind is lower-case inside a name)
    return f"Trung tâm Y tế {district[0].lower()}{district[1:]}"


def _health_station_name(commune: str) -> str:
    return f"Trạm Y tế {commune[0].lower()}{commune[1:]}"


UNIT_KINDS = ("Thành phố ", "Thị xã ", "Quận ", "Huyện ", "Phường ", "Xã ")


def _stem(unit: str) -> str:
    """'Thành phố Hà Giang' -> 'Hà Giang'."""
    for kind in UNIT_KINDS:
        if unit.startswith(kind):
            return unit[len(kind) :]
    return unit


def _is_urban(district: str) -> bool:
    return district.startswith(("Quận", "Thành phố", "Thị xã"))


@dataclass(slots=True)
class _District:
    province: Province
    code: str
    name: str
    lat: float
    lon: float
    capital: bool = False
    island: Island | None = None
    facility_code: str = ""


def _districts(province: Province) -> list[_District]:
    named: list[tuple[str, float, float]] = [(province.capital, province.lat, province.lon)]
    named += [(n, lat, lon) for p, n, lat, lon in NAMED_DISTRICTS if p == province.code]
    islands = [i for i in ISLAND_DISTRICTS if i.province == province.code]
    generated = province.districts - len(named) - len(islands)
    if generated < 0:
        raise ValueError(f"province {province.code}: more named districts than districts")
    rng = _rng("districts", province.code)
    taken = {_stem(n) for n, _, _ in named} | {_stem(i.district) for i in islands}
    stems = [s for s in rng.sample(PLACE_NAMES, generated + len(taken)) if s not in taken]
    spread = 0.2 if province.code in CITY_PROVINCES else 0.35
    result: list[_District] = []
    for index, (name, lat, lon) in enumerate(named):
        result.append(_District(province, "", name, lat, lon, capital=index == 0))
    for island in islands:
        result.append(
            _District(province, "", island.district, island.lat, island.lon, island=island)
        )
    for index, stem in enumerate(stems[:generated]):
        if province.code in CITY_PROVINCES and index < generated // 2:
            kind = "Quận"
        else:
            kind = "Thị xã" if rng.random() < 0.1 else "Huyện"
        lat, lon = _near(rng, province.lat, province.lon, spread)
        result.append(_District(province, "", f"{kind} {stem}", lat, lon))
    for index, district in enumerate(result, start=1):
        district.code = f"{province.code}.{index:02d}"
    return result


def _nearest(lat: float, lon: float, hubs: Sequence[Hub]) -> Hub:
    # An equirectangular approximation is plenty to pick the closest hub within one country.
    scale = math.cos(math.radians(lat))
    return min(hubs, key=lambda h: (h.lat - lat) ** 2 + ((h.lon - lon) * scale) ** 2)


def _regional_hub(lat: float) -> str:
    if lat >= 17.0:
        return "bach-mai"
    return "hue" if lat >= 13.5 else "cho-ray"


class _Planner:
    """Accumulates the plan stage by stage; the order of the stages fixes the facility codes."""

    def __init__(self) -> None:
        self.areas: list[AreaPlan] = []
        self.facilities: list[FacilityPlan] = []
        self.departments: list[DepartmentPlan] = []
        self.links: list[LinkPlan] = []
        self.keys: dict[str, str] = {}
        self.districts: list[_District] = []
        self.offered: dict[str, list[str]] = {}  # facility code -> specialty codes
        self._sequence: dict[str, int] = {}
        self._licences = 0

    def next_moh_code(self, province: str) -> str:
        self._sequence[province] = self._sequence.get(province, 0) + 1
        return f"{province}-{self._sequence[province]:03d}"

    def add_vietnam_areas(self) -> None:
        for province in PROVINCES:
            self.areas.append(AreaPlan("VN", province.code, AreaLevel.PROVINCE, province.name))
        for province in PROVINCES:
            for district in _districts(province):
                self.districts.append(district)
                self.areas.append(
                    AreaPlan(
                        "VN",
                        district.code,
                        AreaLevel.DISTRICT,
                        district.name,
                        parent=province.code,
                    )
                )

    def add_hubs(self) -> None:
        # First in every province, so their codes are 001, 002, ... at every scale.
        district_code = {(d.province.code, d.name): d.code for d in self.districts}
        for index, hub in enumerate(HUBS):
            moh = self.next_moh_code(hub.province)
            code = self.keys[hub.key] = f"VN-{moh}"
            self.facilities.append(
                FacilityPlan(
                    code=code,
                    name=hub.name,
                    country="VN",
                    province=hub.province,
                    area=district_code[(hub.province, hub.district)],
                    tier=hub.tier,
                    facility_type=hub.facility_type,
                    latitude=hub.lat,
                    longitude=hub.lon,
                    languages=hub.languages,
                    beds=hub.beds,
                    moh_code=moh,
                    fhir_version="5.0" if index % 3 == 2 else "4.0",
                    key=hub.key,
                )
            )
            self._add_departments(hub, code)

    def _add_departments(self, hub: Hub, code: str) -> None:
        rng = _rng("departments", hub.key)
        specialties = hub.specialties
        if not specialties:
            extra = set(rng.sample(PROVINCIAL_OPTIONAL, rng.randint(2, 5)))
            specialties = PROVINCIAL_CORE + tuple(s for s in PROVINCIAL_OPTIONAL if s in extra)
        central = hub.tier == Tier.CENTRAL
        self.offered[code] = list(specialties)
        for specialty in specialties:
            consultants = []
            for _ in range(rng.randint(2, 4) if central else rng.randint(1, 3)):
                self._licences += 1
                consultants.append(
                    (
                        rng.choice(FAMILY_NAMES),
                        rng.choice(GIVEN_NAMES),
                        f"{self._licences:06d}/BYT-CCHN",
                    )
                )
            self.departments.append(
                DepartmentPlan(
                    facility=code,
                    specialty=specialty,
                    name=DEPARTMENT_NAMES[specialty],
                    offers_async=True,
                    offers_live=central or rng.random() < 0.5,
                    offers_transfer=central or rng.random() < 0.85,
                    accepting=central or rng.random() >= 0.05,
                    daily_capacity=rng.randint(30, 80) if central else rng.randint(8, 30),
                    sla_hours=rng.choice((24, 48) if central else (24, 48, 72)),
                    languages=hub.languages,
                    consultants=tuple(consultants),
                )
            )

    def add_district_centres(self) -> None:
        for district in self.districts:
            province = district.province
            moh = self.next_moh_code(province.code)
            district.facility_code = code = f"VN-{moh}"
            rng = _rng("district-centre", district.code)
            island = district.island
            if island:
                self.keys[island.key] = code
            remote = bool(island) or (
                province.highland and not district.capital and rng.random() < 0.35
            )
            self.facilities.append(
                FacilityPlan(
                    code=code,
                    name=island.hospital if island else _health_centre_name(district.name),
                    country="VN",
                    province=province.code,
                    area=district.code,
                    tier=Tier.DISTRICT,
                    facility_type="district health centre",
                    latitude=round(district.lat, 5),
                    longitude=round(district.lon, 5),
                    beds=rng.randrange(60, 310, 10),
                    is_remote=remote,
                    moh_code=moh,
                    fhir_version=(
                        rng.choice(("4.0", "4.0", "5.0")) if island or rng.random() < 0.1 else None
                    ),
                    key=island.key if island else "",
                )
            )
            if island and island.key == REFERRER_KEY:
                # The demo referrer's own paediatric ward: where a counter-referral (the
                # children's hospital referring the patient back down) is addressed.
                self.departments.append(
                    DepartmentPlan(
                        facility=code,
                        specialty=PEDIATRICS,
                        name="Khoa Nhi",
                        offers_async=True,
                        offers_live=False,
                        offers_transfer=False,
                        accepting=True,
                        daily_capacity=5,
                        sla_hours=72,
                        languages=("vi",),
                        consultants=(),
                    )
                )

    def add_commune_stations(self, count: int) -> None:
        """The island stations, then the rest spread evenly over the mainland districts."""
        generated = count - len(ISLAND_COMMUNES)
        if generated < 0:
            raise ValueError(f"at least {len(ISLAND_COMMUNES)} commune stations are needed")
        by_district: dict[str, list[tuple[str, float, float, str]]] = {}
        island_district = {d.island.key: d for d in self.districts if d.island}
        for key, island_key, name, lat, lon in ISLAND_COMMUNES:
            district_code = island_district[island_key].code
            by_district.setdefault(district_code, []).append((name, lat, lon, key))
        mainland = [d for d in self.districts if d.island is None]
        bonus = set(_rng("communes").sample(range(len(mainland)), generated % len(mainland)))
        for index, district in enumerate(mainland):
            per_district = generated // len(mainland) + (1 if index in bonus else 0)
            rng = _rng("communes", district.code)
            kind = "Phường" if _is_urban(district.name) else "Xã"
            for stem in rng.sample(PLACE_NAMES, per_district):
                lat, lon = _near(rng, district.lat, district.lon, 0.08)
                by_district.setdefault(district.code, []).append((f"{kind} {stem}", lat, lon, ""))

        planned: list[tuple[_District, str, str, float, float, str]] = []
        for district in self.districts:
            for index, (name, lat, lon, key) in enumerate(by_district.get(district.code, ()), 1):
                planned.append((district, f"{district.code}.{index:03d}", name, lat, lon, key))
        # Named stations take their codes first, so their codes do not depend on the scale.
        planned.sort(key=lambda station: not station[5])
        remote_rngs: dict[str, random.Random] = {}
        for district, area, name, lat, lon, key in planned:
            province = district.province
            remote_rng = remote_rngs.setdefault(district.code, _rng("remote", district.code))
            self.areas.append(AreaPlan("VN", area, AreaLevel.COMMUNE, name, parent=district.code))
            moh = self.next_moh_code(province.code)
            code = f"VN-{moh}"
            if key:
                self.keys[key] = code
            remote = (
                bool(key)
                or district.island is not None
                or (province.highland and remote_rng.random() < 0.35)
            )
            self.facilities.append(
                FacilityPlan(
                    code=code,
                    name=_health_station_name(name),
                    country="VN",
                    province=province.code,
                    area=area,
                    tier=Tier.COMMUNE,
                    facility_type="commune health station",
                    latitude=lat,
                    longitude=lon,
                    is_remote=remote,
                    parent=district.facility_code,
                    moh_code=moh,
                    key=key,
                )
            )

    def add_partners(self) -> None:
        for partner in PARTNERS:
            partner_area = f"{partner.province}.01"
            self.areas += [
                AreaPlan(
                    partner.country,
                    partner.province,
                    AreaLevel.PROVINCE,
                    partner.province_name,
                    partner.province_local,
                ),
                AreaPlan(
                    partner.country,
                    partner_area,
                    AreaLevel.DISTRICT,
                    partner.district,
                    partner.district_local,
                    parent=partner.province,
                ),
            ]
            code = self.keys[partner.key] = f"{partner.country}-{partner.province}-001"
            self.facilities.append(
                FacilityPlan(
                    code=code,
                    name=partner.name,
                    name_local=partner.name_local,
                    country=partner.country,
                    province=partner.province,
                    area=partner_area,
                    tier=Tier.PROVINCIAL,
                    facility_type="provincial hospital",
                    latitude=partner.lat,
                    longitude=partner.lon,
                    languages=partner.languages,
                    beds=partner.beds,
                    is_remote=True,
                    fhir_version=partner.fhir_version,
                    key=partner.key,
                )
            )

    def add_links(self) -> None:
        """Every Vietnamese lower-tier site is supported by its province's hospital (or the
        nearest general hospital where the network has none), by its regional central hospital
        for a few specialties, and often by a national specialised hospital. Provincial
        hospitals are spokes of central ones too, so cases can be escalated."""
        rng = _rng("links")
        code_of = self.keys

        def sample_of(hub_key: str, low: int, high: int) -> tuple[str, ...]:
            own = self.offered[code_of[hub_key]]
            chosen = set(rng.sample(own, min(len(own), rng.randint(low, high))))
            return tuple(s for s in own if s in chosen)

        def link(hub_key: str, spoke: str, specialties: tuple[str, ...]) -> None:
            self.links.append(LinkPlan(code_of[hub_key], spoke, specialties, DOMESTIC_LINKS_FROM))

        for hub in PROVINCIAL_HOSPITALS:
            link(_regional_hub(hub.lat), code_of[hub.key], ())
            specialist = rng.choice(SPECIALIST_HUBS)
            link(specialist, code_of[hub.key], sample_of(specialist, 1, 3))

        general = [h for h in HUBS if h.facility_type in (GENERAL, PROVINCIAL)]
        provincial = {h.province: h for h in PROVINCIAL_HOSPITALS}
        province_by_code = {p.code: p for p in PROVINCES}
        local_hub = {
            p.code: (provincial.get(p.code) or _nearest(p.lat, p.lon, general)).key
            for p in PROVINCES
        }
        fixed = {spoke: (hub, specs) for hub, spoke, specs in FIXED_SPECIALIST_LINKS}
        key_of = {code: key for key, code in self.keys.items()}
        for facility in self.facilities:
            if facility.country != "VN" or facility.tier < Tier.DISTRICT:
                continue
            province = province_by_code[facility.province]
            local = local_hub[province.code]
            regional = _regional_hub(province.lat)
            supports: dict[str, tuple[str, ...]] = {local: ()}
            if regional != local:
                supports[regional] = sample_of(regional, 2, 4)
            key = key_of.get(facility.code, "")
            if key in fixed:
                hub_key, specs = fixed[key]
                supports[hub_key] = specs
            elif regional == local or rng.random() < 0.5:
                specialist = rng.choice(SPECIALIST_HUBS)
                supports[specialist] = sample_of(specialist, 1, 3)
            for hub_key, specs in supports.items():
                link(hub_key, facility.code, specs)

        for hub_key, spoke_key, specs, agreement, identifiable in CROSS_BORDER_LINKS:
            self.links.append(
                LinkPlan(
                    code_of[hub_key],
                    code_of[spoke_key],
                    specs,
                    CROSS_BORDER_LINKS_FROM,
                    is_cross_border=True,
                    agreement_reference=agreement,
                    identifiable_data_allowed=identifiable,
                )
            )
        for planned in self.links:
            missing = set(planned.specialties) - set(self.offered[planned.hub])
            if missing:
                raise ValueError(f"{planned.hub} has no department for {sorted(missing)}")

    def result(self) -> NetworkPlan:
        return NetworkPlan(
            areas=tuple(self.areas),
            facilities=tuple(self.facilities),
            departments=tuple(self.departments),
            links=tuple(self.links),
            keys=dict(self.keys),
        )


def network_plan(lower_tier: int = SCALES["default"]) -> NetworkPlan:
    """The demo network with ``lower_tier`` lower-tier hospitals (district health centres,
    commune health stations and the three partners abroad) under the 26 upper-tier hospitals.

    The stages run in a fixed order and each draws from its own random streams, so the upper
    tier, the district centres and their links are the same at every scale."""
    planner = _Planner()
    planner.add_vietnam_areas()
    planner.add_hubs()
    planner.add_district_centres()
    planner.add_commune_stations(lower_tier - len(PARTNERS) - len(planner.districts))
    planner.add_partners()
    planner.add_links()
    return planner.result()


# --- Writing --------------------------------------------------------------------------------------

M = TypeVar("M", bound=models.Model)


def _insert(model: type[M], rows: Sequence[M], bar: tqdm[Any]) -> Sequence[M]:
    for start in range(0, len(rows), BATCH_SIZE):
        chunk = rows[start : start + BATCH_SIZE]
        model._default_manager.bulk_create(chunk)
        bar.update(len(chunk))
    # PostgreSQL and SQLite >= 3.35 return the new keys; the rows below depend on them.
    if rows and rows[0].pk is None:
        raise RuntimeError(f"the database did not return primary keys for {model.__name__}")
    return rows


def _ensure_reference_data() -> None:
    # The data migrations load these; repeated here so the seed also works on a database built
    # without migrations (pytest --no-migrations).
    for role in Role:
        Group.objects.get_or_create(name=str(role))
    existing = set(Specialty.objects.filter(system=Specialty.SNOMED).values_list("code", flat=True))
    Specialty.objects.bulk_create(
        Specialty(system=Specialty.SNOMED, code=code, display=display)
        for code, display in PRACTICE_SETTING_SPECIALTIES
        if code not in existing
    )


def network_write(plan: NetworkPlan, *, progress: bool = False) -> None:
    """Write the plan with bulk inserts (the caller holds the transaction)."""
    _ensure_reference_data()
    countries = {
        code: Country.objects.get_or_create(
            code=code, defaults={"name": name, "name_local": local}
        )[0]
        for code, name, local in COUNTRIES
    }
    specialty_ids = dict(
        Specialty.objects.filter(system=Specialty.SNOMED).values_list("code", "id")
    )
    with tqdm(
        total=plan.row_count(),
        desc="seed_demo",
        unit="row",
        file=sys.stderr,
        # None: only on a terminal, so logs and CI output stay free of carriage returns.
        disable=None if progress else True,
        leave=False,
    ) as bar:
        area_ids: dict[tuple[str, str], int] = {}
        for level in AreaLevel:
            rows = [
                AdministrativeArea(
                    country=countries[a.country],
                    level=a.level,
                    code=a.code,
                    name=a.name,
                    name_local=a.name_local,
                    parent_id=area_ids[(a.country, a.parent)] if a.parent else None,
                )
                for a in plan.areas
                if a.level == level
            ]
            for area in _insert(AdministrativeArea, rows, bar):
                area_ids[(area.country.code, area.code)] = area.pk

        facility_ids: dict[str, int] = {}
        created: list[Facility] = []
        # Parents first: commune stations point at their district health centre.
        for with_parent in (False, True):
            rows_f = [
                Facility(
                    code=f.code,
                    name=f.name,
                    name_local=f.name_local,
                    # bulk_create skips Facility.save(), which derives this.
                    search_name=search_key(f"{f.name} {f.name_local}"),
                    country=countries[f.country],
                    province_id=area_ids[(f.country, f.province)],
                    area_id=area_ids[(f.country, f.area)],
                    tier=f.tier,
                    facility_type=f.facility_type,
                    latitude=f.latitude,
                    longitude=f.longitude,
                    parent_id=facility_ids[f.parent] if f.parent else None,
                    languages=list(f.languages),
                    beds=f.beds,
                    is_remote=f.is_remote,
                )
                for f in plan.facilities
                if (f.parent is not None) == with_parent
            ]
            for facility in _insert(Facility, rows_f, bar):
                facility_ids[facility.code] = facility.pk
            created.extend(rows_f)

        # Every facility change leaves a revision (docs/registry.md), the seed's too: in the
        # importer's shape for a created facility (fields from null, identifiers from none).
        identifiers = {
            f.code: [f"{MOH_FACILITY_CODE_SYSTEM}|{f.moh_code}"] if f.moh_code else []
            for f in plan.facilities
        }
        _insert(
            FacilityRevision,
            [
                FacilityRevision(
                    facility_id=facility.pk,
                    source="seed",
                    changes={
                        **{
                            k: [None, v]
                            for k, v in facility_snapshot(facility).items()
                            if v is not None
                        },
                        "identifiers": [None, identifiers[facility.code]],
                    },
                )
                for facility in created
            ],
            bar,
        )

        _insert(
            FacilityIdentifier,
            [
                FacilityIdentifier(
                    facility_id=facility_ids[f.code],
                    system=MOH_FACILITY_CODE_SYSTEM,
                    value=f.moh_code,
                )
                for f in plan.facilities
                if f.moh_code
            ],
            bar,
        )
        _insert(
            Endpoint,
            [
                Endpoint(
                    facility_id=facility_ids[f.code],
                    name=f"{f.name} — FHIR",
                    base_url=f"{ENDPOINT_BASE}/{f.code}",
                    fhir_version=f.fhir_version,
                )
                for f in plan.facilities
                if f.fhir_version
            ],
            bar,
        )

        rows_d = [
            Department(
                facility_id=facility_ids[d.facility],
                specialty_id=specialty_ids[d.specialty],
                name=d.name,
                offers_async=d.offers_async,
                offers_live=d.offers_live,
                offers_transfer=d.offers_transfer,
                accepting=d.accepting,
                daily_capacity=d.daily_capacity,
                sla_hours=d.sla_hours,
                languages=list(d.languages),
            )
            for d in plan.departments
        ]
        _insert(Department, rows_d, bar)
        practitioners: list[Practitioner] = []
        posts: list[Department] = []
        for plan_d, department in zip(plan.departments, rows_d, strict=True):
            for family, given, licence in plan_d.consultants:
                practitioners.append(
                    Practitioner(
                        family_name=family,
                        given_name=given,
                        license_number=licence,
                        languages=list(plan_d.languages),
                    )
                )
                posts.append(department)
        _insert(Practitioner, practitioners, bar)
        _insert(
            PractitionerRole,
            [
                PractitionerRole(
                    practitioner=practitioner,
                    facility_id=department.facility_id,
                    department=department,
                    code=PractitionerRole.Code.CONSULTANT,
                )
                for practitioner, department in zip(practitioners, posts, strict=True)
            ],
            bar,
        )

        rows_l = [
            SupportLink(
                hub_id=facility_ids[link.hub],
                spoke_id=facility_ids[link.spoke],
                valid_from=link.valid_from,
                # bulk_create skips SupportLink.save(), which derives this.
                is_cross_border=link.is_cross_border,
                agreement_reference=link.agreement_reference,
                identifiable_data_allowed=link.identifiable_data_allowed,
            )
            for link in plan.links
        ]
        _insert(SupportLink, rows_l, bar)
        through = SupportLink.specialties.through
        _insert(
            through,
            [
                through(supportlink_id=row.pk, specialty_id=specialty_ids[specialty])
                for link, row in zip(plan.links, rows_l, strict=True)
                for specialty in link.specialties
            ],
            bar,
        )


def _demo_password_hash() -> str:
    return _demo_password_hash_with(settings.PASSWORD_HASHERS[0])


@functools.cache
def _demo_password_hash_with(hasher: str) -> str:
    # Hashing is slow by design (PBKDF2): hash once and reuse the hash for every account. The
    # preferred hasher is the cache key, so a settings change (tests) gets a matching hash.
    return make_password(DEMO_PASSWORD)


def demo_accounts_ensure(keys: Mapping[str, str]) -> list[str]:
    """Create or repair the demo accounts; return the usernames created. Existing passwords
    are kept (hashing costs time at every `make run`), unusable ones are reset to the demo one."""
    _ensure_reference_data()
    created: list[str] = []
    for spec in DEMO_ACCOUNTS:
        facility = Facility.objects.get(code=keys[spec.facility]) if spec.facility else None
        department = (
            Department.objects.get(facility=facility, specialty__code=spec.department)
            if spec.department
            else None
        )
        user, is_new = User.objects.get_or_create(username=spec.username)
        if is_new or not user.has_usable_password():
            user.password = _demo_password_hash()
        if is_new:
            created.append(spec.username)
        user.first_name = spec.given_name
        user.last_name = spec.family_name
        user.facility = facility
        user.is_active = True
        user.save()
        user.groups.set([Group.objects.get(name=str(spec.role))])
        user.departments.set([department] if department else [])
        if spec.practitioner_role and facility:
            practitioner, _ = Practitioner.objects.get_or_create(
                user=user,
                defaults={
                    "family_name": spec.family_name,
                    "given_name": spec.given_name,
                    "languages": list(spec.languages),
                },
            )
            PractitionerRole.objects.get_or_create(
                practitioner=practitioner,
                facility=facility,
                department=department,
                code=spec.practitioner_role,
            )
    return created


@dataclass(frozen=True)
class SeedResult:
    built: bool  # False: the network was already there
    accounts_created: list[str]
    counts: dict[str, int]


def demo_counts() -> dict[str, int]:
    vn_hubs = Facility.objects.filter(country__code="VN", tier__lte=Tier.PROVINCIAL)
    return {
        "countries": Country.objects.count(),
        "areas": AdministrativeArea.objects.count(),
        "facilities": Facility.objects.count(),
        "upper-tier (VN)": vn_hubs.count(),
        "central": Facility.objects.filter(tier=Tier.CENTRAL).count(),
        "district": Facility.objects.filter(tier=Tier.DISTRICT).count(),
        "commune": Facility.objects.filter(tier=Tier.COMMUNE).count(),
        "abroad": Facility.objects.exclude(country__code="VN").count(),
        "remote": Facility.objects.filter(is_remote=True).count(),
        "departments": Department.objects.count(),
        "practitioners": Practitioner.objects.count(),
        "endpoints": Endpoint.objects.count(),
        "support links": SupportLink.objects.count(),
        "cross-border links": SupportLink.objects.filter(is_cross_border=True).count(),
        "demo accounts": User.objects.filter(
            username__in=[a.username for a in DEMO_ACCOUNTS]
        ).count(),
    }


def demo_seed(*, scale: str = "default", progress: bool = False) -> SeedResult:
    """Build the demo network unless it exists, then make sure the demo accounts exist.

    Refusing this outside development is the caller's job (the command checks DEBUG)."""
    plan = network_plan(SCALES[scale])
    with transaction.atomic():
        built = not Facility.objects.filter(code=plan.keys[MARKER_KEY]).exists()
        if built:
            network_write(plan, progress=progress)
        created = demo_accounts_ensure(plan.keys)
    return SeedResult(built=built, accounts_created=created, counts=demo_counts())
