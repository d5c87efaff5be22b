"""Typed application state keys (one place for every ``app[...]`` entry)."""

from __future__ import annotations

from aiohttp import web

from recsvc.admission import Admission, LoopLag
from recsvc.experiments import ExperimentsHolder
from recsvc.exposures import ExposureLog
from recsvc.ingest import Ingestor
from recsvc.itemcache import ItemCache
from recsvc.metrics import GaugeSampler
from recsvc.middleware import Guard
from recsvc.models import ModelRegistry
from recsvc.recommend import Recommender
from recsvc.settings import Settings
from recsvc.store import FeatureStore, RedisClient

SETTINGS = web.AppKey("settings", Settings)
REDIS_URL = web.AppKey("redis_url", str)
REDIS = web.AppKey[RedisClient]("redis")
STORE = web.AppKey("store", FeatureStore)
ITEMS = web.AppKey("items", ItemCache)
MODELS = web.AppKey("models", ModelRegistry)
RECOMMENDER = web.AppKey("recommender", Recommender)
INGESTOR = web.AppKey("ingestor", Ingestor)
EXPERIMENTS = web.AppKey("experiments", ExperimentsHolder)
EXPOSURES = web.AppKey("exposures", ExposureLog)
OPENAPI = web.AppKey("openapi", bytes)
METRICS_SAMPLER = web.AppKey("metrics_sampler", GaugeSampler)
ADMISSION = web.AppKey("admission", Admission)
LOOP_LAG = web.AppKey("loop_lag", LoopLag)
GUARD = web.AppKey("guard", Guard)
