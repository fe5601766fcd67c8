"""`Gateway`: the gateway's state and routing (`policy.state`, `policy.routing`) and its named
mutators, the only ways to change it at run time: `set_theta`, `set_share`, `add_model`,
`remove_model`, `reload`, `snapshot`. The admin endpoints (`edge.admin`) parse a body and call
one of them; nothing else writes the state.

Each mutator is blocking (a store copy, a file, a bundle load: call it in a worker thread) and
takes the admin lock, so mutators run one at a time; readers never wait (the router swaps its
decider and store, the backends map is replaced whole).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tagrouter_fast.core import TagDecider, TagRouterError
from tagrouter_fast.serve.config import BackendConfig
from tagrouter_fast.serve.edge.errors import ApiError, bad
from tagrouter_fast.serve.forward.backends import Backend
from tagrouter_fast.serve.learn.shared_log import SharedStateError
from tagrouter_fast.serve.learn.state import StateError
from tagrouter_fast.serve.policy.routing import Routing

__all__ = ["Gateway"]

log = logging.getLogger("tagrouter.serve")


class Gateway(Routing):
    """The state of one gateway app, its routing and its named mutators."""

    def _update_decider(self, fn: Callable[[TagDecider], TagDecider]) -> TagDecider:
        """Replaces the router's decider (theta, candidates) without losing a concurrent store
        update (`TagRouter.update_decider` is serialised with store writers). Readers never
        wait."""
        return self.router.update_decider(fn)

    def _update_store(self, fn: Callable[[Any], Any]) -> None:
        if self.learner is not None:
            self.learner.update_store(fn)
        else:
            self.router.update_store(fn)

    # ---- the operating point ----

    def set_theta(self, theta: float) -> dict[str, Any]:
        """Routes at ``theta`` from now on."""
        with self._admin_lock:
            dec = self._update_decider(lambda d: d.with_theta(float(theta)))
            return {"theta": dec.theta}

    def set_share(self, share: float, queries: Sequence[str] | None = None) -> dict[str, Any]:
        """Routes at the theta sending at most ``share`` of ``queries`` (default: the recent
        traffic) to M_LLM.

        Raises:
            ApiError: no queries given and no traffic seen yet (400).
        """
        with self._admin_lock:
            sample = self.router.tags_batch(list(queries)) if queries is not None \
                else self.budget.sample()
            if not sample:
                raise bad("queries", "no traffic seen yet: give queries to set the budget on")
            holder: dict[str, float] = {}

            def budget(d: TagDecider) -> TagDecider:
                holder["theta"] = d.theta_for_llm_share(sample, float(share))
                return d.with_theta(holder["theta"])

            self._update_decider(budget)
            return {"theta": holder["theta"], "llm_share": share, "queries": len(sample)}

    # ---- models ----

    def add_model(
        self, cfg: BackendConfig, *, cost: float, judgments: str | None,
        like: str | list[str] | None, as_llm: bool, table_model: str,
    ) -> dict[str, Any]:
        """Adds a backend and its model to the store (durably, through the learner when there
        is one) and to the candidates: ``judgments`` (a routing-table directory) scored as
        ``table_model``, or copied from ``like`` (a model, a list, or ``"pool"``: every routed
        model).

        Raises:
            ApiError: the name exists (409), unreadable judgments or an unknown
                ``table_model`` (400), a refused add (400 / 409).
            ConfigError: the backend's ``api_key_env`` is not set.
        """
        from tagrouter_fast.add_model import AddModelError, ModelExistsError, add_model
        from tagrouter_fast.data.table import load_table

        with self._admin_lock:
            name = cfg.name
            if name in self.backends or name in self.aliases:
                raise ApiError(409, f"backend.name: {name!r} exists already",
                               param="backend.name")
            if like == "pool":
                like = list(self.router.decider.models)
            backend = Backend.from_config(cfg, "backend")
            try:
                table = None if judgments is None else load_table(Path(judgments))
            except OSError as e:
                raise bad("judgments", f"cannot read {e.filename or judgments} "
                          f"({e.strerror or e})") from None
            if table is not None and table_model not in table.models:
                raise bad("table_model", f"{table_model!r} is not in {judgments} (models: "
                          f"{table.models})")
            # The backend first, so that a decision for the new model always finds it.
            self.backends = {**self.backends, name: backend}
            try:
                # The one add-model path (also `TagRouter.add_model`, `tagrouter add-model`).
                # The store change goes through the learner when there is one, which makes it
                # durable (a snapshot) before answering; then the new model becomes a candidate.
                added = add_model(self.router, table, name, cost=float(cost),
                                  table_model=None if table is None else table_model, like=like,
                                  as_llm=as_llm, update_store=self._update_store)
            except ModelExistsError as e:
                self._drop_backend(name)
                raise ApiError(409, str(e), param="backend.name") from None
            except AddModelError as e:
                self._drop_backend(name)
                raise ApiError(400, str(e)) from None
            except BaseException:
                self._drop_backend(name)
                raise
            return {"model": name, "judgments": added.judgments, "copied": added.copied,
                    "models": added.models, "llm": added.llm}

    def _drop_backend(self, name: str) -> None:
        self.backends = {k: v for k, v in self.backends.items() if k != name}

    def remove_model(self, name: str) -> dict[str, Any]:
        """Takes a backend and its model out: first out of the candidates, then out of the store,
        then the backend, then the sessions on it.

        Raises:
            ApiError: no such backend (404), the only routed model (409).
        """
        with self._admin_lock:
            if name not in self.backends:
                raise ApiError(404, f"no backend named {name!r}")
            dec = self.router.decider
            if name in dec.models:
                if len(dec.models) <= 1:
                    raise ApiError(409, f"{name!r} is the only routed model")

                def drop(d: TagDecider) -> TagDecider:
                    # First out of the candidates (same store), so the store swap below is legal.
                    return TagDecider(
                        d.scorer, costs={m: c for m, c in d.costs.items() if m != name},
                        llm=None if d.llm == name else d.llm, theta=d.theta,
                        fallback=None if d.fallback == name else d.fallback,
                        aggregation=d.aggregation,
                    )

                self._update_decider(drop)
            if name in self.router.scorer.models:
                self._update_store(lambda s: s.without_model(name))
            # The backend goes after the decider no longer picks it.
            self._drop_backend(name)
            self.sessions.drop_model(name)
            return {"removed": name, "models": self.router.decider.models}

    # ---- the store and the bundle ----

    def snapshot(self) -> dict[str, Any]:
        """A snapshot of the learned store now.

        Raises:
            ApiError: feedback is off (503).
        """
        with self._admin_lock:
            learner = self.learner
            if learner is None:
                raise ApiError(503, "feedback is off: set [feedback] state_dir in the config")
            path = learner.snapshot()
            return {"snapshot": str(path), "version": learner.version}

    def reload(self) -> dict[str, Any]:
        """Re-reads the bundle (``router.bundle``) with the running tagger, and reopens the
        learner on it.

        Raises:
            ApiError: no bundle configured, a bundle that cannot be loaded, or a state directory
                started on another store (409; the previous bundle keeps routing).
        """
        from tagrouter_fast.router import TagRouter

        with self._admin_lock:
            bundle = self.config.router.bundle
            if bundle is None:
                raise ApiError(409, "router.bundle is not set: nothing to reload")
            # The running tagger is kept (no second encoder load); the bundle's fingerprint
            # check still refuses a store built with another tagger.
            try:
                loaded = TagRouter.load(bundle, tagger=self.router.tagger)
            except (ValueError, TagRouterError, OSError) as e:
                raise ApiError(409, f"reload refused: {e}; still routing with the previous "
                               "bundle", code="reload_refused") from None
            fresh = self._prepare_router(loaded)
            bundle_tags = fresh.scorer.tags  # before the learner swaps in its snapshot
            old = self.learner
            if old is not None:
                # One process per state directory: the old learner lets go before the new one
                # opens (and replays the journal onto the fresh bundle). A state directory
                # started on another store refuses (its snapshot would replace the new
                # bundle's): the old learner reopens and the reload is refused with the reason.
                old.close()
                self.learner = None
                try:
                    self.learner = self._open_learner(fresh)
                except (StateError, SharedStateError) as e:
                    self.learner = self._open_learner(self.router)
                    raise ApiError(409, f"reload refused: {e}") from None
            self.router = fresh
            # New decisions travel with the new bundle's tags; tokens on the old ones still
            # verify.
            self.tokens.use_tags(bundle_tags)
            return {"models": fresh.decider.models, "theta": fresh.decider.theta}
