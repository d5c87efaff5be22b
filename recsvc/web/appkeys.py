"""Typed application state keys (one place for every ``app[...]`` entry)."""

from __future__ import annotations

from aiohttp import web

from recsvc.ab.experiments import ExperimentsHolder
from recsvc.ab.impressions import ImpressionLog
from recsvc.ab.rollout import RolloutStore
from recsvc.ops.looplag import LoopLag
from recsvc.ops.metrics import GaugeSampler
from recsvc.ranking.models import ModelRegistry
from recsvc.service.admission import Admission
from recsvc.service.ingest import Ingestor
from recsvc.service.itemcache import ItemCache
from recsvc.service.online import FeaturesGate
from recsvc.service.recommend import Recommender
from recsvc.settings import Settings
from recsvc.store.client import RedisClient
from recsvc.store.feature_store import FeatureStore
from recsvc.web.access import Access
from recsvc.web.middleware import Guard

SETTINGS = web.AppKey("settings", Settings)
REDIS_URL = web.AppKey("redis_url", str)
REDIS = web.AppKey[RedisClient]("redis")
STORE = web.AppKey("store", FeatureStore)
ITEMS = web.AppKey("items", ItemCache)
MODELS = web.AppKey("models", ModelRegistry)
ROLLOUTS = web.AppKey("rollouts", RolloutStore)
RECOMMENDER = web.AppKey("recommender", Recommender)
INGESTOR = web.AppKey("ingestor", Ingestor)
EXPERIMENTS = web.AppKey("experiments", ExperimentsHolder)
IMPRESSIONS = web.AppKey("impressions", ImpressionLog)
OPENAPI = web.AppKey("openapi", bytes)
METRICS_SAMPLER = web.AppKey("metrics_sampler", GaugeSampler)
ADMISSION = web.AppKey("admission", Admission)
LOOP_LAG = web.AppKey("loop_lag", LoopLag)
GUARD = web.AppKey("guard", Guard)
ACCESS = web.AppKey("access", Access)
FEATURES_GATE = web.AppKey("features_gate", FeaturesGate)
