"""Radon in Minnesota homes: the inference-gym "radon contextual effects" model on the real data.

    log_radon ~ Normal(log_uranium * w[0] + floor * w[1] + floor_by_county * w[2] + county_effect[county],
                       log_radon_scale)
    county_effect[c] ~ Normal(county_effect_mean, county_effect_scale)

with county_effect_mean ~ Normal(0, 1), county_effect_scale ~ Uniform(0, 100), w ~ Normal(0, 1)
(3 values) and log_radon_scale ~ Uniform(0, 100), exactly as TensorFlow Probability's
inference_gym writes `radon_contextual_effects_minnesota` (whose long-run reference posterior
is in benchmarks/data/radon_mn_reference.json). 919 houses in 85 counties.

The county effects are centred on their mean. `log_uranium` and `floor_by_county` are constant
within a county, so the county effects can absorb `w[0]` and `w[2]`: two likelihood-invariant
directions that plain mean-field VI cannot see.

Data: the EPA radon survey as analysed by Gelman & Hill (files srrs2.dat and cty.dat, as shipped
in the public repository mgorinova/autoreparam), preprocessed as inference_gym does: Minnesota
houses, floor <= 1, activity <= 0 set to 0.1, log transform; `floor_by_county` is the county mean
of `floor`. The data are written out below (activity x 10 is an integer for every house) so
that this file is self-contained; `model_args()` rebuilds the arrays, which agree with
inference_gym's preprocessed file to float32 precision (benchmarks/data/PROVENANCE.md).

    autoreparam analyze examples/radon_mn.py
"""

import numpy as np

import numpyro
import numpyro.distributions as dist


def model(log_uranium, floor, floor_by_county, county, num_counties, log_radon=None):
    county_effect_mean = numpyro.sample("county_effect_mean", dist.Normal(0.0, 1.0))
    county_effect_scale = numpyro.sample("county_effect_scale", dist.Uniform(0.0, 100.0))
    with numpyro.plate("counties", num_counties):
        county_effect = numpyro.sample("county_effect", dist.Normal(county_effect_mean, county_effect_scale))
    with numpyro.plate("weights", 3):
        weight = numpyro.sample("weight", dist.Normal(0.0, 1.0))
    log_radon_scale = numpyro.sample("log_radon_scale", dist.Uniform(0.0, 100.0))
    loc = (log_uranium * weight[0] + floor * weight[1] + floor_by_county * weight[2]
           + county_effect[county])
    with numpyro.plate("houses", len(county)):
        numpyro.sample("log_radon", dist.Normal(loc, log_radon_scale), obs=log_radon)


def load_data():
    """The per-house arrays of inference_gym's radon_contextual_effects_minnesota (float32)."""
    activity = np.array(ACTIVITY_X10.split(), dtype=np.float64) / 10.0
    floor = np.array([int(c) for c in FLOOR], dtype=np.float64)
    county = np.repeat(np.arange(len(COUNTY_SIZES)), COUNTY_SIZES)
    floor_by_county = (np.bincount(county, weights=floor) / np.asarray(COUNTY_SIZES))[county]
    return {
        "log_uranium": np.asarray(LOG_URANIUM, dtype=np.float32)[county],
        "floor": floor.astype(np.float32),
        "floor_by_county": floor_by_county.astype(np.float32),
        "county": county.astype(np.int32),
        "num_counties": len(COUNTY_SIZES),
        "log_radon": np.log(activity).astype(np.float32),
    }


def model_args():
    d = load_data()
    args = (d["log_uranium"], d["floor"], d["floor_by_county"], d["county"], d["num_counties"])
    return args, {"log_radon": d["log_radon"]}


# -- data (public: EPA National Residential Radon Survey, Minnesota) ----------------------------
# Radon activity (pCi/L) x 10 per house, houses sorted by county (0.1 where the survey had <= 0).

ACTIVITY_X10 = (
    "22 22 29 10 31 25 15 10 7 12 12 13 14 4 11 45 13 21 59 33 18 54 63 19 66 31 68 70 77 52 45 "
    "44 28 81 16 42 54 40 23 29 14 33 29 18 2 24 11 22 6 17 29 22 17 14 19 18 12 43 45 63 46 57 "
    "22 4 46 44 66 27 29 29 72 50 26 50 130 72 68 128 58 95 60 38 143 18 69 47 95 25 67 40 101 22 "
    "18 34 56 43 39 13 42 8 20 16 129 147 47 96 1 37 74 19 53 40 77 14 100 94 8 44 50 21 17 81 9 "
    "129 26 35 266 15 130 88 195 25 90 131 36 69 48 34 9 34 27 14 68 111 1 25 18 16 10 9 29 44 15 "
    "41 25 67 43 55 36 28 146 67 80 26 28 44 17 20 20 15 96 81 35 8 51 32 108 82 63 48 60 11 87 "
    "88 68 23 16 28 65 17 46 33 44 212 91 9 49 50 11 76 54 36 49 47 14 34 42 25 14 14 19 48 14 38 "
    "88 43 44 45 22 5 58 54 72 57 74 48 68 64 37 55 78 44 27 34 42 23 13 52 1 25 32 32 96 42 90 "
    "63 326 132 22 56 143 69 76 98 26 435 49 49 35 48 56 35 39 67 79 33 21 16 40 18 25 112 26 39 "
    "74 13 9 4 25 60 20 54 30 29 55 41 39 149 72 23 28 44 15 86 56 86 38 18 19 55 25 8 21 28 39 "
    "43 47 28 41 16 43 7 55 33 55 25 27 84 33 32 86 17 57 130 27 47 56 138 76 57 46 76 26 45 59 "
    "22 24 40 46 46 109 76 30 15 16 165 31 51 49 60 9 18 39 56 4 26 36 62 236 39 29 30 47 30 42 "
    "38 30 43 29 34 85 90 48 36 22 28 8 15 46 37 36 30 22 19 26 18 24 43 26 11 33 25 94 13 84 50 "
    "29 131 153 18 38 79 26 113 41 123 67 69 45 9 17 14 20 10 10 28 13 113 160 13 13 16 9 28 5 15 "
    "71 5 101 43 33 29 125 42 45 39 33 175 106 79 35 65 69 51 120 51 89 58 46 39 15 238 9 14 11 "
    "28 482 9 83 41 5 67 75 92 5 15 103 39 18 99 23 44 28 11 12 16 254 1 106 23 39 72 21 32 5 57 "
    "14 21 44 24 49 30 30 28 39 109 64 20 30 45 21 80 13 92 11 106 240 91 121 81 108 42 157 54 62 "
    "97 81 16 16 64 44 112 100 45 80 23 32 50 41 11 20 11 29 21 78 38 25 29 17 25 94 6 27 11 21 "
    "120 126 32 42 38 37 58 3 41 28 19 12 12 15 94 17 121 43 69 14 25 96 38 34 68 36 22 26 21 70 "
    "12 38 35 42 16 28 86 62 52 27 12 35 55 101 55 12 49 40 35 25 12 27 17 31 7 10 19 38 89 74 "
    "207 60 21 58 97 64 46 56 190 24 30 51 77 81 47 84 16 60 11 114 43 36 103 34 31 36 27 40 12 "
    "17 42 193 91 20 114 102 21 12 32 20 43 22 54 252 51 23 32 25 28 31 16 47 40 50 15 48 8 5 24 "
    "23 46 110 149 86 45 15 39 18 16 5 4 5 87 16 14 87 111 15 11 9 7 42 34 21 29 18 18 24 17 8 "
    "117 18 28 35 36 35 30 32 31 33 17 56 34 15 322 11 21 8 15 13 31 72 14 13 15 50 23 24 12 54 "
    "11 14 72 11 33 32 15 36 8 16 14 27 33 9 6 20 19 9 54 15 31 18 9 33 17 31 7 43 14 18 15 22 24 "
    "27 17 11 18 2 22 46 21 20 7 64 30 20 9 33 18 18 22 43 75 64 83 21 33 13 50 10 70 57 101 66 "
    "26 33 15 50 74 145 18 74 26 37 19 22 50 73 37 29 44 84 51 36 15 86 106 80 45 30 24 15 48 68 "
    "21 60 29 67 193 40 59 90 84 11 31 115 96 29 7 32 47 48 4 93 17 9 102 77 22 65 122 46 62 65 "
    "28 19 12 24 10 12 16 8 17 47 17 33 8 98 53 85 19 66 38 59 49 25 107 24 21 47 37 134 29 43 38 "
    "18 15 18 13 66 204 60 138 102 57 93 34 41 116 72 47 18 7 47 102 113 76 118 5 67 53 31 21 73 "
    "51 22 23 159 95 64 45 50 37 29"
)

# Lowest living level: 1 = first floor, 0 = basement.

FLOOR = (
    "10000000000000000000000000000000000000000001101000000000101000111100100000000010001000010100"
    "00100000000110100000000000000010010000010001101000011100100000110000000010100000010000000000"
    "00000000000000000000000000001000000000000000100000001001000000001101010000000000001000000000"
    "00100000000000100000000001000000000101000000000000001000000000000000100000100010000000000000"
    "10001011100100000000000000000000000000001100110111010000000001010100000010100000001011100100"
    "10000000000001011100000010000001000000000010100000000000001000000000000100000010010110100010"
    "10001000001011000000000000011000000010000000000000000100100000100000001101101000011111000100"
    "10000000000000000010000000000001101000001000100000100010001001000000000000000000000100000000"
    "00000000000100010000100011000000000000000000000010000101000000001000000000000000000011000000"
    "1000011000001000000000010010000101000000001000000000000000001100000011000001000000010000000"
)

# Houses per county, in county order (COUNTY_NAMES).

COUNTY_SIZES = (
    4, 52, 3, 7, 4, 3, 14, 4, 10, 6, 5, 4, 6, 14, 4, 2, 4, 12, 63, 3, 9, 6, 2, 9, 14, 105,
    6, 5, 3, 11, 5, 4, 4, 3, 7, 2, 9, 4, 5, 4, 8, 1, 9, 7, 13, 5, 2, 9, 13, 1, 4, 3, 3, 23,
    8, 3, 6, 4, 4, 2, 32, 5, 3, 11, 2, 14, 13, 8, 4, 116, 25, 10, 2, 4, 3, 4, 7, 5, 4, 46,
    3, 1, 13, 13, 2,
)

# log of the county's soil uranium (ppm), from cty.dat.

LOG_URANIUM = (
    -0.6890476430406862, -0.8473128709362373, -0.11345874633109981, -0.5933525340174925,
    -0.1428904751285414, 0.38705673391414863, 0.27161368383929196, 0.27757867260694985,
    -0.33231546506278115, 0.09586458770684875, -0.6082198546638046, 0.27368458108644306,
    -0.7353200926262808, 0.3437811581625071, -0.05986039121354569, -0.5049959898074283,
    0.33956033153164783, -0.6333906668713101, -0.0241451462936382, 0.2638554323503227,
    0.15571236167273725, 0.29502507144423584, 0.4149136804111327, 0.22420700008687836,
    0.19661066011899736, -0.096520821058639, 0.5035290421344621, -0.40059693602583185,
    -0.7518722493042075, -0.663347586028351, 0.3090202786499629, -0.053385986836697395,
    0.10973296873281792, -0.007803349210289715, -0.881828899545442, 0.311029891277958,
    -0.6915963979045334, -0.6817087949645395, 0.1944477541477439, 0.4449037762784415,
    0.3947343751769592, 0.14960037629759168, 0.013764816008801804, 0.16586185905562026,
    0.14042264109900046, 0.023950890692199578, -0.21005948851094614, -0.09322663040889452,
    0.26093250844052335, 0.3988499693854642, 0.24804688046586382, 0.40545175657860344,
    0.26522171453191146, 0.2431500571344976, -0.20473034512385127, -0.07402763748942556,
    -0.16329216737797173, 0.4786040126834062, 0.2661111001517909, 0.2811483107499129,
    -0.41805353575114673, 0.3663222626099675, 0.3805779747230187, 0.19314611051881148,
    0.5280248685217432, -0.21204534876555114, 0.06311565544416364, -0.683436486728852,
    0.23721209994245593, -0.4746736929103665, 0.11639543092201812, 0.26980575834976894,
    0.47077835336434587, 0.31602898120937023, -0.04684004160079286, 0.4975944845937416,
    0.15008238554555403, -0.6720296934549587, 0.21241420006241435, -0.14748428533720817,
    0.18323779674990098, 0.23603606341837557, 0.4632118542031466, -0.09002425510882817,
    0.3552869572048709,
)

COUNTY_NAMES = (
    'AITKIN', 'ANOKA', 'BECKER', 'BELTRAMI', 'BENTON', 'BIG STONE',
    'BLUE EARTH', 'BROWN', 'CARLTON', 'CARVER', 'CASS', 'CHIPPEWA',
    'CHISAGO', 'CLAY', 'CLEARWATER', 'COOK', 'COTTONWOOD', 'CROW WING',
    'DAKOTA', 'DODGE', 'DOUGLAS', 'FARIBAULT', 'FILLMORE', 'FREEBORN',
    'GOODHUE', 'HENNEPIN', 'HOUSTON', 'HUBBARD', 'ISANTI', 'ITASCA',
    'JACKSON', 'KANABEC', 'KANDIYOHI', 'KITTSON', 'KOOCHICHING', 'LAC QUI PARLE',
    'LAKE', 'LAKE OF THE WOODS', 'LE SUEUR', 'LINCOLN', 'LYON', 'MAHNOMEN',
    'MARSHALL', 'MARTIN', 'MCLEOD', 'MEEKER', 'MILLE LACS', 'MORRISON',
    'MOWER', 'MURRAY', 'NICOLLET', 'NOBLES', 'NORMAN', 'OLMSTED',
    'OTTER TAIL', 'PENNINGTON', 'PINE', 'PIPESTONE', 'POLK', 'POPE',
    'RAMSEY', 'REDWOOD', 'RENVILLE', 'RICE', 'ROCK', 'ROSEAU',
    'SCOTT', 'SHERBURNE', 'SIBLEY', 'ST LOUIS', 'STEARNS', 'STEELE',
    'STEVENS', 'SWIFT', 'TODD', 'TRAVERSE', 'WABASHA', 'WADENA',
    'WASECA', 'WASHINGTON', 'WATONWAN', 'WILKIN', 'WINONA', 'WRIGHT',
    'YELLOW MEDICINE',
)
