"""Local stand-ins for Entra ID on 127.0.0.1: an OpenID configuration + JWKS
server with keys the tests sign tokens with, and a managed-identity token
endpoint (the App Service protocol azure_identity speaks)."""

import base64
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


def _b64(n: int) -> str:
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Server:
    """A threaded HTTP server on 127.0.0.1:0 answering with `handler(path, query, headers)`."""

    def __init__(self, handler):
        outer = self
        self.hits = []

        class H(BaseHTTPRequestHandler):
            def do_GET(self):
                u = urlparse(self.path)
                outer.hits.append((u.path, dict(self.headers)))
                status, body = handler(u.path, parse_qs(u.query), self.headers)
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()


class FakeEntra:
    """OpenID configuration and JWKS for one tenant, and a token minter."""

    TENANT = "11111111-2222-3333-4444-555555555555"
    AUDIENCE = "https://cognitiveservices.azure.com"
    APP_ID = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"

    def __init__(self):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "test-key-1"
        self.server = Server(self._handle)
        self.issuer = f"https://login.microsoftonline.com/{self.TENANT}/v2.0"
        self.openid_url = f"{self.server.url}/{self.TENANT}/v2.0/.well-known/openid-configuration"

    def _handle(self, path, query, headers):
        if path.endswith("/.well-known/openid-configuration"):
            return 200, {"issuer": self.issuer, "jwks_uri": f"{self.server.url}/{self.TENANT}/discovery/v2.0/keys"}
        if path.endswith("/discovery/v2.0/keys"):
            pub = self.key.public_key().public_numbers()
            return 200, {"keys": [{"kty": "RSA", "use": "sig", "kid": self.kid, "alg": "RS256", "n": _b64(pub.n), "e": _b64(pub.e)}]}
        return 404, {"error": "not found"}

    def token(self, *, aud=None, exp_in=3600, key=None, kid=None, app_id=None, roles=None, **extra) -> str:
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "aud": aud or self.AUDIENCE,
            "iat": now,
            "nbf": now - 5,
            "exp": now + exp_in,
            "azp": app_id or self.APP_ID,
            "sub": "user-" + str(uuid.uuid4())[:8],
            "tid": self.TENANT,
            "oid": str(uuid.uuid4()),
            "ver": "2.0",
            **extra,
        }
        if roles is not None:
            claims["roles"] = roles
        return jwt.encode(claims, key or self.key, algorithm="RS256", headers={"kid": kid or self.kid})


class FakeManagedIdentity:
    """The App Service / Container Apps managed-identity endpoint."""

    HEADER = "local-identity-header-value"

    def __init__(self, token: str, lifetime_s: int = 3600):
        self.token = token
        self.lifetime_s = lifetime_s
        self.resources = []
        self.server = Server(self._handle)
        self.endpoint = f"{self.server.url}/msi/token"

    def _handle(self, path, query, headers):
        if path != "/msi/token" or headers.get("x-identity-header") != self.HEADER:
            return 401, {"error": "unauthorized"}
        resource = query.get("resource", [""])[0]
        self.resources.append(resource)
        return 200, {
            "access_token": self.token,
            "expires_on": str(int(time.time()) + self.lifetime_s),
            "resource": resource,
            "token_type": "Bearer",
        }

    def fetches(self) -> int:
        return sum(1 for p, _ in self.server.hits if p == "/msi/token")


class CaptureBackend:
    """An Azure OpenAI stand-in that records every request's headers and
    answers a minimal chat completion (for checking what a backend receives)."""

    def __init__(self):
        outer = self
        self.requests = []

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(n)
                outer.requests.append((self.path, dict(self.headers)))
                body = json.dumps({
                    "id": "chatcmpl-capture", "object": "chat.completion", "created": 0, "model": "gpt-4o",
                    "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "ok"}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()
