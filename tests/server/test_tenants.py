"""Tenants: keys from the tenants file and JWTs signed in the test, scopes on every route
family, per-tenant limits, per-tenant metrics; in process, on fake models."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from asgi_lifespan import LifespanManager
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from server import tenants as tenants_module
from server import tokens as tokens_module
from server.app import create_app
from server.logs import configure
from server.settings import Settings
from server.tenants import TenantsFile
from tests.server.fakes import FakeTextModel
from tests.server.live import metric
from tests.server.test_app import wait_until_admitted, wait_until_ready
from tests.server.test_versions import serve

pytestmark = pytest.mark.asyncio

SECRET = "a-test-secret-of-at-least-32-bytes!"
TENANTS = """
[defaults]
requests_per_s = 1000

[tenants.acme]
weight = 3

[[keys]]
key = "acme-key"
tenant = "acme"

[[keys]]
sha256 = "{beta_digest}"
tenant = "beta"
scopes = ["predict:emb"]

[[keys]]
key = "ops-key"
tenant = "ops"
scopes = ["admin"]
"""


def digest(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode()).hexdigest()


def tenants_text() -> str:
    return TENANTS.format(beta_digest=digest("beta-key"))


def write_tenants(path: Path, text: str | None = None) -> Path:
    path.write_text(text if text is not None else tenants_text())
    return path


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def two_models() -> dict[str, FakeTextModel]:
    return {"emb": FakeTextModel(name="emb"), "other": FakeTextModel(name="other")}


def token(claims: dict[str, Any] | None = None, *, key: Any = SECRET, alg: str = "HS256",
          kid: str | None = None, drop: tuple[str, ...] = ()) -> str:  # fmt: skip
    now = int(time.time())
    body: dict[str, Any] = {"sub": "acme", "scope": "predict", "exp": now + 300, "iat": now}
    body.update(claims or {})
    for name in drop:
        body.pop(name)
    headers = {"kid": kid} if kid else None
    return jwt.encode(body, key, algorithm=alg, headers=headers)


# -- keys ------------------------------------------------------------------------------


async def test_keys_name_tenants_and_scopes_guard_each_model(tmp_path: Path) -> None:
    path = write_tenants(tmp_path / "tenants.toml")
    async with serve(two_models(), tenants_file=path) as client:
        acme = await client.post("/predict", json={"text": "a", "model": "other"},
                                 headers=bearer("acme-key"))  # fmt: skip
        beta_own = await client.post("/predict", json={"text": "b", "model": "emb"},
                                     headers=bearer("beta-key"))  # fmt: skip
        beta_other = await client.post("/predict", json={"text": "b", "model": "other"},
                                       headers=bearer("beta-key"))  # fmt: skip
        ops = await client.post("/predict", json={"text": "c"}, headers=bearer("ops-key"))
        unknown = await client.post("/predict", json={"text": "d"}, headers=bearer("nope"))
        missing = await client.post("/predict", json={"text": "e"})
        text = (await client.get("/metrics")).text
    assert (acme.status_code, beta_own.status_code) == (200, 200)
    assert beta_other.status_code == 403
    assert "'predict:other'" in beta_other.json()["detail"]
    assert 'scope="predict:other"' in beta_other.headers["www-authenticate"]
    assert ops.status_code == 403
    assert "'predict'" in ops.json()["detail"]
    assert unknown.status_code == 401
    assert missing.status_code == 401
    assert "missing API key" in missing.json()["detail"]
    assert metric(text, 'microbatch_tenant_requests_total{tenant="acme"}') == 1
    assert metric(text, 'microbatch_tenant_rejected_total{tenant="beta",limit="scope"}') == 1
    assert metric(text, 'microbatch_tenant_device_seconds_total{tenant="acme"}') > 0


async def test_a_key_revoked_in_the_file_is_refused_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tenants_module, "RELOAD_CHECK_S", 0.0)
    path = write_tenants(tmp_path / "tenants.toml")
    async with serve(FakeTextModel(), tenants_file=path) as client:
        before = await client.post("/predict", json={"text": "a"}, headers=bearer("acme-key"))
        write_tenants(path, tenants_text().replace('key = "acme-key"', 'key = "acme-key-2"'))
        revoked = await client.post("/predict", json={"text": "a"}, headers=bearer("acme-key"))
        rotated = await client.post("/predict", json={"text": "a"}, headers=bearer("acme-key-2"))
        path.write_text("[[keys]\nbroken")  # a bad edit keeps the file in force
        still = await client.post("/predict", json={"text": "a"}, headers=bearer("acme-key-2"))
    assert before.status_code == 200
    assert revoked.status_code == 401
    assert rotated.status_code == 200
    assert still.status_code == 200


async def test_sighup_reads_the_file_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os
    import signal

    monkeypatch.setattr(tenants_module, "RELOAD_CHECK_S", 1e9)  # only the signal reads it
    path = write_tenants(tmp_path / "tenants.toml")
    async with serve(FakeTextModel(), tenants_file=path) as client:
        first = await client.post("/predict", json={"text": "a"}, headers=bearer("acme-key"))
        write_tenants(path, tenants_text().replace('key = "acme-key"', 'key = "acme-key-2"'))
        kept = await client.post("/predict", json={"text": "a"}, headers=bearer("acme-key"))
        assert signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL  # else it would kill us
        os.kill(os.getpid(), signal.SIGHUP)
        async with asyncio.timeout(10):
            while True:  # the handler runs on a later turn of the loop
                reply = await client.post(
                    "/predict", json={"text": "a"}, headers=bearer("acme-key")
                )
                if reply.status_code != 200:
                    break
                await asyncio.sleep(0.01)
    assert (first.status_code, kept.status_code) == (200, 200)
    assert reply.status_code == 401


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[[keys]]\ntenant = 'a'\n", "give each key as `key` or as `sha256`"),
        ("[[keys]]\nkey = 'k'\ntenant = 'a'\nscopes = ['write']\n", "scope 'write'"),
        ("[tenants.a]\nweight = 0\n", "tenants.a.weight"),
        ("[defaults]\nrequests_per_s = 'fast'\n", "defaults.requests_per_s"),
        ("[[keys]\n", "not TOML"),
    ],
)
async def test_a_bad_tenants_file_stops_the_start_with_the_reason(
    tmp_path: Path, text: str, reason: str
) -> None:
    path = write_tenants(tmp_path / "tenants.toml", text)
    with pytest.raises(ValueError, match="--tenants-file") as failed:
        create_app(Settings(tenants_file=path), model=FakeTextModel())  # type: ignore[arg-type]
    assert reason in str(failed.value)


# -- JWTs ------------------------------------------------------------------------------


async def test_a_valid_token_names_its_tenant_and_every_wrong_claim_is_refused() -> None:
    now = int(time.time())
    issued = {"iss": "https://id.example", "aud": "microbatch"}
    other_secret = "another-secret-of-at-least-32-bytes"
    wrong = {
        "token expired": token({**issued, "exp": now - 120}),
        "not valid yet": token({**issued, "nbf": now + 600}),
        "wrong issuer": token({**issued, "iss": "someone-else"}),
        "another audience": token({**issued, "aud": "another-api"}),
        "no 'iss' claim": token({"aud": "microbatch"}),
        "signature does not verify": token(issued, key=other_secret),
        "no 'exp' claim": token(issued, drop=("exp",)),
        "no 'sub' claim": token(issued, drop=("sub",)),
        "algorithm 'none' not accepted": jwt.encode(
            {**issued, "sub": "acme", "exp": now + 60}, None, algorithm="none"
        ),
        "malformed token": "eyJhbGciOiJIUzI1NiJ9.not-base64!.x",
    }
    good = token(issued)
    settings = {"jwt_secret": SECRET, "jwt_issuer": "https://id.example",
                "jwt_audience": "microbatch", "jwt_leeway_s": 30}  # fmt: skip
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    try:
        configure("info", "json")
        async with serve(FakeTextModel(), **settings) as client:
            ok = await client.post("/predict", json={"text": "a"}, headers=bearer(good))
            refused = {
                name: await client.post("/predict", json={"text": "a"}, headers=bearer(t))
                for name, t in wrong.items()
            }
            text = (await client.get("/metrics")).text
    finally:
        logging.getLogger().removeHandler(handler)
    assert ok.status_code == 200, ok.text
    assert metric(text, 'microbatch_tenant_requests_total{tenant="acme"}') == 1
    for name, reply in refused.items():
        assert reply.status_code == 401, name
        challenge = reply.headers["www-authenticate"]
        assert 'error="invalid_token"' in challenge, name
        assert name in reply.json()["detail"], (name, reply.json()["detail"])
        assert name in challenge, name
    logged = stream.getvalue()
    for credential in (good, *wrong.values()):
        assert credential not in logged


async def test_a_token_within_the_clock_skew_passes() -> None:
    now = int(time.time())
    async with serve(FakeTextModel(), jwt_secret=SECRET, jwt_leeway_s=30) as client:
        late = await client.post("/predict", json={"text": "a"},
                                 headers=bearer(token({"exp": now - 10})))  # fmt: skip
    assert late.status_code == 200


async def test_scopes_come_from_scope_or_scp_and_guard_each_route_family() -> None:
    models = {"emb": FakeTextModel(name="emb"), "rr": FakeTextModel(name="rr", task="rerank")}
    only_emb = token({"scope": "predict:emb"})
    scp_list = token({"scope": None, "scp": ["predict"]}, drop=("scope",))
    admin = token({"scope": "admin"})
    nothing = token(drop=("scope",))
    routes: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/predict", {"text": "a", "model": "rr"}),
        ("POST", "/predict/batch", {"texts": ["a"], "model": "rr"}),
        ("POST", "/v1/embeddings", {"input": "a", "model": "rr"}),
        ("POST", "/embed", {"inputs": "a", "model": "rr"}),
        ("POST", "/rerank", {"query": "q", "texts": ["a"], "model": "rr"}),
        ("POST", "/v1/rerank", {"query": "q", "documents": ["a"], "model": "rr"}),
        ("POST", "/v2/rerank", {"query": "q", "documents": ["a"], "model": "rr"}),
    ]
    async with serve(models, jwt_secret=SECRET) as client:

        async def call(credential: str, method: str, path: str, body: dict[str, Any]) -> int:
            reply = await client.request(method, path, json=body, headers=bearer(credential))
            return reply.status_code

        narrow = [await call(only_emb, *route) for route in routes]
        admin_on_predict = [await call(admin, *route) for route in routes]
        none_on_predict = [await call(nothing, *route) for route in routes]
        broad = await call(
            scp_list, "POST", "/rerank", {"query": "q", "texts": ["a"], "model": "rr"}
        )
        own = await call(only_emb, "POST", "/predict", {"text": "a", "model": "emb"})
        admin_ok = await client.get("/admin/batching", headers=bearer(admin))
        admin_no = await client.get("/admin/batching", headers=bearer(scp_list))
        admin_bad = await client.get("/admin/batching", headers=bearer(token({"exp": 1})))
    # /v1/embeddings and /embed on a reranker answer 400 wrong_task after the scope check
    # passes, so what matters is that the narrow token is stopped first: 403.
    assert narrow == [403] * len(routes), narrow
    assert admin_on_predict == [403] * len(routes)
    assert none_on_predict == [403] * len(routes)
    assert (broad, own) == (200, 200)
    assert admin_ok.status_code == 200
    assert admin_no.status_code == 403
    assert 'scope="admin"' in admin_no.headers["www-authenticate"]
    assert admin_bad.status_code == 403


def b64(number: int, size: int) -> str:
    return base64.urlsafe_b64encode(number.to_bytes(size, "big")).rstrip(b"=").decode()


def jwks_of(*keys: tuple[str, Any]) -> dict[str, Any]:
    """A JWKS, as an identity provider publishes one, of the public halves of `keys`."""
    out = []
    for kid, private in keys:
        numbers = private.public_key().public_numbers()
        if isinstance(private, rsa.RSAPrivateKey):
            size = (numbers.n.bit_length() + 7) // 8
            jwk = {"kty": "RSA", "n": b64(numbers.n, size), "e": b64(numbers.e, 3)}
        else:
            jwk = {"kty": "EC", "crv": "P-256", "x": b64(numbers.x, 32), "y": b64(numbers.y, 32)}
        out.append({**jwk, "kid": kid, "use": "sig"})
    return {"keys": out}


async def test_keys_rotated_in_the_jwks_file_take_effect_and_old_ones_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens_module, "FILE_CHECK_S", 0.0)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks_of(("r1", rsa_key), ("e1", ec_key))))
    rs = token(key=rsa_key, alg="RS256", kid="r1")
    es = token(key=ec_key, alg="ES256", kid="e1")
    rotated = token(key=new_key, alg="RS256", kid="r2")
    hs = token()  # HS256 is not accepted without a secret
    async with serve(FakeTextModel(), jwt_jwks=str(path)) as client:

        async def status(credential: str) -> int:
            reply = await client.post("/predict", json={"text": "a"}, headers=bearer(credential))
            return reply.status_code

        before = [await status(t) for t in (rs, es, rotated, hs)]
        path.write_text(json.dumps(jwks_of(("r2", new_key))))
        after = [await status(t) for t in (rs, es, rotated)]
        path.write_text("not json")  # a broken file keeps the set in force
        kept = await status(rotated)
        hostile = token(key=new_key, alg="RS256", kid='x"\r\nSet-Cookie: a=b' + "k" * 500)
        refused = await client.post("/predict", json={"text": "a"}, headers=bearer(hostile))
    assert refused.status_code == 401
    assert "set-cookie" not in refused.headers
    assert '"' not in refused.headers["www-authenticate"].split("error_description=")[1][1:-1]
    assert len(refused.json()["detail"]) < 200
    assert before == [200, 200, 401, 401]
    assert after == [401, 401, 200]
    assert kept == 200


async def test_a_jwks_file_that_cannot_be_read_stops_the_start(tmp_path: Path) -> None:
    app = create_app(Settings(jwt_jwks=str(tmp_path / "absent.json")), model=FakeTextModel())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--jwt-jwks"):
        async with LifespanManager(app, startup_timeout=30):
            pass


# -- limits ----------------------------------------------------------------------------


def limited_file(path: Path, section: str) -> Path:
    keys = "".join(f'[[keys]]\nkey = "{t}-key"\ntenant = "{t}"\n' for t in ("acme", "beta"))
    return write_tenants(path, f"[tenants.acme]\n{section}\n{keys}")


async def test_requests_per_second_per_tenant(tmp_path: Path) -> None:
    path = limited_file(tmp_path / "t.toml", "requests_per_s = 0.001\nburst = 2")
    async with serve(FakeTextModel(), tenants_file=path) as client:
        acme = [await client.post("/predict", json={"text": "a"}, headers=bearer("acme-key"))
                for _ in range(3)]  # fmt: skip
        beta = await client.post("/predict", json={"text": "b"}, headers=bearer("beta-key"))
        text = (await client.get("/metrics")).text
    assert [r.status_code for r in acme] == [200, 200, 429]
    assert acme[2].headers["x-limit"] == "requests_per_s"
    assert int(acme[2].headers["retry-after"]) >= 1
    assert "requests/s" in acme[2].json()["detail"]
    assert beta.status_code == 200  # another tenant is not limited by acme's use
    rejected = 'microbatch_tenant_rejected_total{tenant="acme",limit="requests_per_s"}'
    assert metric(text, rejected) == 1


async def test_tokens_per_second_per_tenant(tmp_path: Path) -> None:
    path = limited_file(tmp_path / "t.toml", "tokens_per_s = 0.001\ntoken_burst = 512")
    texts = [f"{i}" * 200 for i in range(4)]  # cut to the fake's 64 tokens: 256 a request
    async with serve(FakeTextModel(), tenants_file=path) as client:
        replies = [
            await client.post("/predict/batch", json={"texts": texts}, headers=bearer("acme-key"))
            for _ in range(3)
        ]
        beta = await client.post(
            "/predict/batch", json={"texts": texts}, headers=bearer("beta-key")
        )
    assert [r.status_code for r in replies] == [200, 200, 429]
    assert replies[-1].headers["x-limit"] == "tokens_per_s"
    assert "tokens/s" in replies[-1].json()["detail"]
    assert beta.status_code == 200


async def test_inputs_in_flight_per_tenant(tmp_path: Path) -> None:
    path = limited_file(tmp_path / "t.toml", "max_concurrent = 2")
    model = FakeTextModel()
    model.predict_gate.clear()
    async with serve(model, tenants_file=path, max_batch_size=8) as client:
        held = asyncio.create_task(
            client.post("/predict/batch", json={"texts": ["a", "b"]}, headers=bearer("acme-key"))
        )
        await asyncio.to_thread(model.entered.wait, 10)  # the two are on the device
        over = await client.post("/predict", json={"text": "c"}, headers=bearer("acme-key"))
        beta = asyncio.create_task(
            client.post("/predict", json={"text": "d"}, headers=bearer("beta-key"))
        )
        model.predict_gate.set()
        first, other = await held, await beta
        after = await client.post("/predict", json={"text": "e"}, headers=bearer("acme-key"))
    assert over.status_code == 429
    assert over.headers["x-limit"] == "max_concurrent"
    assert "2 inputs in flight" in over.json()["detail"]
    assert (first.status_code, other.status_code, after.status_code) == (200, 200, 200)


async def test_a_daily_quota_per_tenant(tmp_path: Path) -> None:
    path = limited_file(tmp_path / "t.toml", "daily_items = 3")
    async with serve(FakeTextModel(), tenants_file=path) as client:
        two = await client.post("/predict/batch", json={"texts": ["a", "b"]},
                                headers=bearer("acme-key"))  # fmt: skip
        over = await client.post("/predict/batch", json={"texts": ["c", "d"]},
                                 headers=bearer("acme-key"))  # fmt: skip
        last = await client.post("/predict", json={"text": "e"}, headers=bearer("acme-key"))
        none = await client.post("/predict", json={"text": "f"}, headers=bearer("acme-key"))
    assert (two.status_code, over.status_code, last.status_code) == (200, 429, 200)
    assert none.status_code == 429
    assert none.headers["x-limit"] == "daily_items"
    assert 1 <= int(none.headers["retry-after"]) <= 86_400  # until the UTC day ends


async def test_limits_with_workers_are_refused(tmp_path: Path) -> None:
    from server.preflight import problems

    path = limited_file(tmp_path / "t.toml", "daily_items = 3")
    found = problems(Settings(tenants_file=path, workers=2, model=("x=/nonexistent",)))
    assert any("count per process" in p for p in found), found


# -- metrics ---------------------------------------------------------------------------


async def test_tenant_series_are_bounded(tmp_path: Path) -> None:
    async with serve(FakeTextModel(), jwt_secret=SECRET, tenant_labels=2) as client:
        for name in ("t1", "t2", "t3", "t4"):
            reply = await client.post("/predict", json={"text": name},
                                      headers=bearer(token({"sub": name})))  # fmt: skip
            assert reply.status_code == 200
        text = (await client.get("/metrics")).text
    assert metric(text, 'microbatch_tenant_requests_total{tenant="t1"}') == 1
    assert metric(text, 'microbatch_tenant_requests_total{tenant="t2"}') == 1
    assert metric(text, 'microbatch_tenant_requests_total{tenant="other"}') == 2
    assert 'tenant="t3"' not in text
    assert metric(text, 'microbatch_tenant_items_total{tenant="other"}') == 2


async def test_the_prediction_log_names_each_rows_tenant(tmp_path: Path) -> None:
    import sqlite3

    path = write_tenants(tmp_path / "tenants.toml")
    db = tmp_path / "log.db"
    model = {"emb": FakeTextModel(name="emb")}  # beta may call emb only
    async with serve(model, tenants_file=path, log_url=str(db)) as client:
        for key in ("acme-key", "beta-key"):
            reply = await client.post("/predict", json={"text": key}, headers=bearer(key))
            assert reply.status_code == 200
    conn = sqlite3.connect(db)
    try:
        tenants = [t for (t,) in conn.execute("SELECT tenant FROM predictions ORDER BY id")]
    finally:
        conn.close()
    assert tenants == ["acme", "beta"]


async def test_the_dashboard_shows_each_tenants_share(tmp_path: Path) -> None:
    path = write_tenants(tmp_path / "tenants.toml")
    async with serve({"emb": FakeTextModel(name="emb")}, tenants_file=path) as client:
        for key, n in (("acme-key", 3), ("beta-key", 1)):
            for i in range(n):
                body = {"text": f"{key}{i}"}
                assert (await client.post("/predict", json=body, headers=bearer(key))).is_success
        refused = await client.post("/predict", json={"text": "x"}, headers=bearer("ops-key"))
        data = (await client.get("/dashboard/data")).json()
    assert refused.status_code == 403
    tenants = {t["tenant"]: t for t in data["tenants"]}
    assert (tenants["acme"]["requests"], tenants["acme"]["items"]) == (3, 3)
    assert (tenants["beta"]["requests"], tenants["ops"]["rejected"]) == (1, 1)
    assert sum(t["device_share"] for t in data["tenants"]) == pytest.approx(1.0)


async def test_a_bulk_tenants_requests_go_to_the_bulk_lane_whatever_they_ask(
    tmp_path: Path,
) -> None:
    text = tenants_text() + '\n[tenants.beta]\nlane = "bulk"\n'
    path = write_tenants(tmp_path / "tenants.toml", text)

    async def lanes(client: httpx.AsyncClient) -> dict[str, float]:
        scraped = (await client.get("/metrics")).text
        return {
            lane: metric(scraped, f'microbatch_queue_wait_seconds_count{{lane="{lane}"}}')
            for lane in ("interactive", "bulk")
        }

    lifted = {**bearer("beta-key"), "x-priority": "interactive", "cache-control": "no-cache"}
    async with serve({"emb": FakeTextModel(name="emb")}, tenants_file=path) as client:
        await client.post("/predict", json={"text": "a"}, headers=bearer("acme-key"))
        await client.post("/predict", json={"text": "b"}, headers=bearer("beta-key"))
        await client.post("/predict", json={"text": "c"}, headers=lifted)
        counted = await lanes(client)
    assert counted == {"interactive": 1, "bulk": 2}
    assert TenantsFile.model_validate({"defaults": {"lane": "bulk"}}).has_limits() is False


async def test_a_jwks_url_is_fetched_again_for_a_new_key_and_its_outage_keeps_the_last_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real HTTP server publishes the JWKS, as an identity provider does: a key rotated
    in is fetched when a token names it; once the provider is down, the keys fetched
    before still verify, and a token naming a key nobody has is refused."""
    import functools
    import http.server
    import threading

    monkeypatch.setattr(tokens_module, "MIN_REFETCH_S", 0.0)
    old, new = (rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in "ab")
    (tmp_path / "jwks.json").write_text(json.dumps(jwks_of(("k1", old))))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    provider = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=provider.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{provider.server_address[1]}/jwks.json"
    try:
        async with serve(FakeTextModel(), jwt_jwks=url) as client:

            async def status(credential: str) -> int:
                reply = await client.post(
                    "/predict", json={"text": "a"}, headers=bearer(credential)
                )
                return reply.status_code

            first = await status(token(key=old, alg="RS256", kid="k1"))
            (tmp_path / "jwks.json").write_text(json.dumps(jwks_of(("k1", old), ("k2", new))))
            rotated = await status(token(key=new, alg="RS256", kid="k2"))
            provider.shutdown()
            provider.server_close()
            kept = await status(token(key=old, alg="RS256", kid="k1", claims={"jti": "x"}))
            unknown = await status(token(key=new, alg="RS256", kid="k3"))  # a failed fetch
            after = await status(token(key=new, alg="RS256", kid="k2", claims={"jti": "y"}))
    finally:
        provider.server_close()
    assert (first, rotated, kept, unknown, after) == (200, 200, 200, 401, 200)


async def test_microbatch_key_prints_a_key_and_an_entry_that_lets_it_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from server.cli import main
    from server.tenants import Tenants

    assert main(["key", "--tenant", "acme", "--scope", "predict:emb", "--scope", "admin"]) == 0
    printed = capsys.readouterr().out
    key = printed.splitlines()[0].rsplit(" ", 1)[1]
    entry = "\n".join(printed.splitlines()[1:])
    assert key not in entry  # the file holds only its digest
    path = write_tenants(tmp_path / "tenants.toml", entry)
    who = Tenants(path).by_key(key.encode())
    assert who is not None
    assert (who.tenant, who.scopes) == ("acme", frozenset({"predict:emb", "admin"}))
    assert main(["key", "--tenant", "acme", "--scope", "write"]) == 2
    assert "scope 'write'" in capsys.readouterr().err


async def test_a_tenants_file_without_keys_keeps_the_server_closed(tmp_path: Path) -> None:
    path = write_tenants(tmp_path / "tenants.toml", "[defaults]\nrequests_per_s = 5\n")
    async with serve(FakeTextModel(), tenants_file=path) as client:
        anonymous = await client.post("/predict", json={"text": "a"})
    assert anonymous.status_code == 401


async def test_hostile_token_headers_get_401_not_500(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token's header is the client's to write: an algorithm that does not fit the key
    it names, a key id in any alphabet, a JWKS emptied by the provider."""
    import jwt as pyjwt

    monkeypatch.setattr(tokens_module, "FILE_CHECK_S", 0.0)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks_of(("r1", rsa_key))))
    mismatched = pyjwt.encode({"sub": "a", "scope": "predict", "exp": int(time.time()) + 60},
                              ec_key, algorithm="ES256", headers={"kid": "r1"})  # fmt: skip
    async with serve(FakeTextModel(), jwt_jwks=str(path)) as client:
        replies = [
            await client.post("/predict", json={"text": "a"}, headers=bearer(t))
            for t in (mismatched, token(key=ec_key, alg="ES256", kid="clé-€-ключ"))
        ]
        good = token(key=rsa_key, alg="RS256", kid="r1")
        before = await client.post("/predict", json={"text": "a"}, headers=bearer(good))
        path.write_text(json.dumps({"keys": []}))  # every key withdrawn
        withdrawn = await client.post("/predict", json={"text": "b"}, headers=bearer(good))
    assert [r.status_code for r in replies] == [401, 401]
    assert "is not a ES256 key" in replies[0].json()["detail"]
    assert before.status_code == 200
    assert withdrawn.status_code == 401


async def test_a_jwks_over_plain_http_is_refused_beyond_loopback() -> None:
    settings = Settings(jwt_jwks="http://idp.example/jwks.json")
    with pytest.raises(ValueError, match="over https"):
        create_app(settings, model=FakeTextModel())  # type: ignore[arg-type]


async def test_oversized_requests_get_422_and_refused_ones_cost_no_quota(tmp_path: Path) -> None:
    path = limited_file(tmp_path / "t.toml", "daily_items = 3\nmax_concurrent = 2")
    model = FakeTextModel()
    model.predict_gate.clear()
    settings = {"tenants_file": path, "max_queue_size": 6, "max_batch_size": 1}
    async with serve(model, **settings) as client:

        def post(key: str, texts: list[str]) -> Awaitable[httpx.Response]:
            return client.post("/predict/batch", json={"texts": texts}, headers=bearer(key))

        too_many = await post("acme-key", ["a", "b", "c"])  # one wave: the queue's half
        held = asyncio.create_task(post("beta-key", ["x"]))
        await asyncio.to_thread(model.entered.wait, 10)
        fill = [
            asyncio.create_task(post("beta-key", t)) for t in (["y1", "y2", "y3"], ["z1", "z2"])
        ]
        await wait_until_admitted(client, 6)  # x on the device, five queued
        full = await post("acme-key", ["a", "b"])  # past the early gate (one more fits)
        model.predict_gate.set()
        await asyncio.gather(held, *fill)
        spent = [await post("acme-key", [f"t{i}"]) for i in range(4)]
    assert too_many.status_code == 422
    assert too_many.json()["type"] == "too_many_inputs"
    assert (full.status_code, full.json()["type"]) == (429, "queue_full")
    # Neither refusal counted against the quota of 3: three pass, the fourth does not.
    assert [r.status_code for r in spent] == [200, 200, 200, 429]
    assert spent[3].headers["x-limit"] == "daily_items"


async def test_the_openai_sdk_raises_its_own_errors_for_each_refusal(tmp_path: Path) -> None:
    """The official client hears a missing scope, a bad token and a tenant's limit as
    the errors it defines for them, with our reason in the message."""
    import openai

    text = tenants_text().replace("weight = 3", "weight = 3\nrequests_per_s = 0.001\nburst = 1")
    path = write_tenants(tmp_path / "tenants.toml", text)
    models = {"emb": FakeTextModel(name="emb"), "other": FakeTextModel(name="other")}
    app = create_app(Settings(tenants_file=path, jwt_secret=SECRET), model=models)  # type: ignore[arg-type]
    async with LifespanManager(app, startup_timeout=30, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as probe:
            await wait_until_ready(probe)

        def sdk(credential: str) -> openai.AsyncOpenAI:
            http = httpx.AsyncClient(transport=transport, base_url="http://t")
            return openai.AsyncOpenAI(base_url="http://t/v1", api_key=credential,
                                      http_client=http, max_retries=0)  # fmt: skip

        with pytest.raises(openai.PermissionDeniedError, match="'predict:other'"):
            await sdk("beta-key").embeddings.create(model="other", input="a")
        expired = token({"exp": int(time.time()) - 600})
        with pytest.raises(openai.AuthenticationError, match="token expired"):
            await sdk(expired).embeddings.create(model="emb", input="a")
        acme = sdk("acme-key")
        await acme.embeddings.create(model="emb", input="a")
        with pytest.raises(openai.RateLimitError, match="requests/s") as limited:
            await acme.embeddings.create(model="emb", input="a")
    assert limited.value.response.headers["x-limit"] == "requests_per_s"
