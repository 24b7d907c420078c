"""Service settings: one pydantic-settings class, read from CMH_* environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Everything the service reads from its environment (prefix CMH_), with safe defaults."""

    model_config = SettingsConfigDict(env_prefix="CMH_", frozen=True)

    artifacts_dir: Path = Field(Path("artifacts"), description="checkpoint and index generations")
    device: str = Field("auto", description="'auto' (CUDA when available), 'cpu' or 'cuda'")
    api_key: SecretStr | None = Field(None, description="when set, build and delete need X-API-Key")
    server_data_dir: Path | None = Field(
        None, description="the only folder whose files and dataset roots build requests may name"
    )
    max_k: int = Field(100, ge=1, description="largest k a search may ask for")
    max_upload_bytes: int = Field(10 * 2**20, ge=1, description="largest image upload")
    max_body_bytes: int = Field(64 * 2**20, ge=1, description="largest request body of any kind")
    max_batch_items: int = Field(1000, ge=1, description="largest item batch of one build request")
    max_image_pixels: int = Field(40_000_000, ge=1, description="decompression-bomb guard")
    max_decode_pixels: int = Field(
        80_000_000, ge=1, description="pixels of all image decodes in progress at once (memory)"
    )
    max_queued_jobs: int = Field(32, ge=1, description="builds waiting to run before a 429")
    search_threads: int = Field(
        default_factory=lambda: os.cpu_count() or 1,
        ge=1,
        description="threads that run filtered text searches, and those that would wait, at "
        "once (default: one per core); more requests wait in the event loop rather than "
        "contend for the cores and the GIL",
    )
    batch_window_ms: float = Field(5.0, ge=0, description="how long image requests wait to batch")
    max_image_batch: int = Field(32, ge=1, description="largest backbone batch of image requests")
    index_backend: Literal["memory", "milvus"] = Field(
        "memory",
        description="the system of record: the local store under artifacts_dir, or one Milvus "
        "collection (milvus_uri, milvus_collection) shared by every serving process",
    )
    milvus_uri: str | None = Field(None, description="Milvus server URL, or a milvus-lite .db file")
    milvus_token: SecretStr | None = Field(None, description="Milvus credentials, when needed")
    milvus_collection: str = Field(
        "cmh_items", min_length=1, description="the Milvus collection that holds the items"
    )
    milvus_timeout_s: float = Field(
        10.0, gt=0, description="longest wait for one Milvus call before a 503 (whole seconds)"
    )
    log_level: str = Field("INFO", description="logging level")
