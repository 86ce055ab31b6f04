"""The search service on Ray Serve: a FastAPI ingress over a `LiveSearcher` per replica."""

# No `from __future__ import annotations` here: FastAPI resolves the endpoints' annotations at
# request time inside a Serve replica, where string annotations (KOpt ...) do not resolve.
import threading
from typing import Annotated, Any

from fastapi import Body, FastAPI, HTTPException, Query, Request
from pydantic import BaseModel, Field
from ray import serve
from starlette.concurrency import run_in_threadpool

from pipeline.config import ConfigError, UpgradeConfig
from pipeline.context import Context
from pipeline.data.shards import DataError
from pipeline.serve.searcher import LiveSearcher, ModelUnavailable, Searcher, UnknownKey

api = FastAPI(
    title="carryover search",
    description="Nearest neighbours from a gallery's serving version (by key, image, vector).",
)

KOpt = Annotated[int | None, Query(ge=1, description="neighbours to return")]
AdapterOpt = Annotated[
    str | None,
    Query(description="embed with the NEW model and map through this query adapter"),
]


class VectorQuery(BaseModel):
    """POST /search/vector: a vector in the serving version's space."""

    vector: list[float] = Field(description="the query embedding")
    k: int | None = Field(None, ge=1, description="neighbours to return")
    exclude_key: str | None = Field(None, description="a key to leave out of the hits")


def _answer(fn, *args) -> dict[str, Any]:
    """Run a query; the user's mistakes become 4xx with the one-line reason."""
    try:
        return fn(*args).to_json()
    except UnknownKey as e:
        raise HTTPException(404, str(e)) from None
    except (DataError, ConfigError, ValueError) as e:
        raise HTTPException(400, str(e)) from None
    except FileNotFoundError as e:  # an adapter that was never fitted
        raise HTTPException(404, str(e)) from None
    except ModelUnavailable as e:
        raise HTTPException(503, str(e)) from None


@serve.deployment(max_ongoing_requests=32)
@serve.ingress(api)
class SearchService:
    """One replica: the serving version in memory, swapped when CURRENT moves."""

    def __init__(self, cfg: UpgradeConfig) -> None:
        ctx = Context(cfg, quiet=True)
        self.cfg = cfg.serve
        self.gallery = ctx.cfg.gallery_uri
        self.live = LiveSearcher(lambda v: Searcher.load(ctx, v), ctx.gallery.current)
        self._stop = threading.Event()
        poll = threading.Thread(
            target=self.live.poll, args=(self.cfg.poll_seconds, self._stop), daemon=True
        )
        poll.start()

    def __del__(self) -> None:
        self._stop.set()

    def _k(self, k: int | None) -> int:
        k = k or self.cfg.top_k
        if k > self.cfg.max_k:
            raise HTTPException(400, f"k={k} is above serve.max_k={self.cfg.max_k}")
        return k

    @api.get("/health")
    def health(self) -> dict[str, Any]:
        """The version served (and the model, rows, swaps so far)."""
        return {"status": "ok", "gallery": self.gallery, **self.live.info()}

    @api.get("/search/key")
    def search_key(self, key: str, k: KOpt = None, adapter: AdapterOpt = None) -> dict[str, Any]:
        """Neighbours of a stored row (itself left out)."""
        return _answer(self.live.searcher.by_key, key, self._k(k), adapter)

    @api.post("/search/vector")
    def search_vector(self, q: Annotated[VectorQuery, Body()]) -> dict[str, Any]:
        """Neighbours of a vector in the serving version's space."""
        return _answer(self.live.searcher.by_vector, q.vector, self._k(q.k), q.exclude_key)

    @api.post("/search/image")
    async def search_image(
        self, request: Request, k: KOpt = None, adapter: AdapterOpt = None
    ) -> dict[str, Any]:
        """Neighbours of an uploaded image: the raw file as the request body."""
        data = await request.body()
        if not data:
            raise HTTPException(400, "empty body: send the image file's bytes")
        if len(data) > self.cfg.max_image_bytes:
            raise HTTPException(413, f"image over serve.max_image_bytes={self.cfg.max_image_bytes}")
        searcher = self.live.searcher  # one version for the whole request
        return await run_in_threadpool(_answer, searcher.by_image, data, self._k(k), adapter)
