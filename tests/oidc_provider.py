"""A tiny OpenID Connect provider served over real HTTP, for the sign-in tests (no network).

It implements the authorization code flow with PKCE (S256): ``/authorize`` answers with a
redirect to the client's ``redirect_uri`` carrying a one-time code, ``/token`` exchanges the code
(checking the client's id, secret and code verifier) for an ID token signed RS256 with a test key
whose public half ``/jwks`` publishes, ``/userinfo`` answers the access token's claims. The test
sets ``provider.identity`` (the next sign-in's claims) and may spoil the ID token through
``provider.tamper`` (e.g. another audience, or a key the JWKS does not list).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

CLIENT_ID = "gateway-test"
CLIENT_SECRET = "test-client-secret-0123456789"
KID = "test-key-1"


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class FakeOidcProvider:
    def __init__(self) -> None:
        self.key = _new_key()
        self.identity: dict[str, Any] = {}
        self.tamper: dict[str, Any] = {}  # claims to override in the ID token; "_key": sign with another key
        self.codes: dict[str, dict[str, Any]] = {}
        self.access: dict[str, dict[str, Any]] = {}
        self.token_requests = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self.issuer = self.base
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def settings(self) -> dict[str, Any]:
        """The gateway's settings that point at this provider (what GATEWAY_OIDC_* would give)."""
        return {
            "GATEWAY_OIDC_ENABLED": True,
            "GATEWAY_OIDC_ISSUER": self.issuer,
            "GATEWAY_OIDC_CLIENT_ID": CLIENT_ID,
            "GATEWAY_OIDC_CLIENT_SECRET": CLIENT_SECRET,
            "GATEWAY_OIDC_AUTHORIZATION_ENDPOINT": f"{self.base}/authorize",
            "GATEWAY_OIDC_TOKEN_ENDPOINT": f"{self.base}/token",
            "GATEWAY_OIDC_JWKS_ENDPOINT": f"{self.base}/jwks",
            "GATEWAY_OIDC_USERINFO_ENDPOINT": f"{self.base}/userinfo",
            "OIDC_RP_CLIENT_ID": CLIENT_ID,
            "OIDC_RP_CLIENT_SECRET": CLIENT_SECRET,
            "OIDC_OP_AUTHORIZATION_ENDPOINT": f"{self.base}/authorize",
            "OIDC_OP_TOKEN_ENDPOINT": f"{self.base}/token",
            "OIDC_OP_JWKS_ENDPOINT": f"{self.base}/jwks",
            "OIDC_OP_USER_ENDPOINT": f"{self.base}/userinfo",
        }

    # --- the protocol ---------------------------------------------------------------------
    def authorize(self, query: dict[str, str]) -> str:
        """The redirect back to the client, with a code bound to this request's nonce and challenge."""
        assert query["response_type"] == "code"
        assert query["client_id"] == CLIENT_ID
        assert "openid" in query["scope"].split()
        assert query["code_challenge_method"] == "S256"
        code = secrets.token_urlsafe(16)
        self.codes[code] = {
            "nonce": query.get("nonce"),
            "challenge": query["code_challenge"],
            "redirect_uri": query["redirect_uri"],
            "identity": dict(self.identity),
        }
        return f"{query['redirect_uri']}?{urlencode({'code': code, 'state': query['state']})}"

    def token(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        self.token_requests += 1
        if form.get("client_id") != CLIENT_ID or form.get("client_secret") != CLIENT_SECRET:
            return 401, {"error": "invalid_client"}
        grant = self.codes.pop(form.get("code", ""), None)
        if grant is None or form.get("redirect_uri") != grant["redirect_uri"]:
            return 400, {"error": "invalid_grant"}
        verifier = form.get("code_verifier", "")
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if challenge != grant["challenge"]:
            return 400, {"error": "invalid_grant", "error_description": "PKCE verification failed"}
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": CLIENT_ID,
            "iat": now,
            "exp": now + 300,
            "nonce": grant["nonce"],
            **grant["identity"],
        }
        tamper = dict(self.tamper)
        key = tamper.pop("_key", self.key)
        claims.update(tamper)
        id_token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})
        access_token = secrets.token_urlsafe(16)
        self.access[access_token] = grant["identity"]
        return 200, {"access_token": access_token, "token_type": "Bearer", "id_token": id_token, "expires_in": 300}

    def jwks(self) -> dict[str, Any]:
        public = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
        return {"keys": [{**public, "kid": KID, "alg": "RS256", "use": "sig"}]}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _json(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/authorize":
                    self.send_response(302)
                    self.send_header("Location", provider.authorize(query))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif url.path == "/jwks":
                    self._json(200, provider.jwks())
                elif url.path == "/userinfo":
                    token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                    identity = provider.access.get(token)
                    self._json(200, identity) if identity is not None else self._json(401, {"error": "invalid_token"})
                else:
                    self._json(404, {"error": "not_found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                if urlsplit(self.path).path == "/token":
                    self._json(*provider.token(form))
                else:
                    self._json(404, {"error": "not_found"})

        return Handler


def other_key() -> rsa.RSAPrivateKey:
    """A key the provider's JWKS does not publish (for a forged ID token)."""
    return _new_key()
