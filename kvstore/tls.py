"""Optional TLS for client and peer traffic (stdlib ``ssl``), from the ``[tls]`` table of a node's config.

Theory of operation
-------------------
One private CA signs a certificate per node; each node's config names its certificate, its key and
the CA (``cert_file``, ``key_file``, ``ca_file``).  With ``cert_file`` set:

* **Client traffic** (``http = true``, the default): the node serves HTTPS with its certificate.
  Clients verify it against the CA (``kvstore --cacert``, ``kvstore.Client(ca_file=...)``), and,
  as any HTTPS client does, that it names the host they dialled (subjectAltName).  Clients do
  not present certificates: the admin routes are protected by the cluster secret, as without TLS.
* **Peer traffic** (``peer = true``, the default): mutual TLS.  The listening node requires a
  certificate signed by the CA; the dialling node verifies the listener's against the CA and
  that it names the member's configured ``host``.  The hello with the cluster secret and member id
  still follows (the CA proves "a node of this deployment", the secret and id which member).

TLS 1.2 at least, with the ``ssl`` module's default ciphers; peers trust only the configured CA,
never the system's trust store.
A certificate the peer does not trust ends the link before the hello: the dialling side records it
as a refused link (``tls_rejected``, kvstore.transport.links).  Under TLS 1.3 a listener's rejection of the
dialler's certificate arrives after the dialler's handshake completed, as a closed connection
before the hello's answer; that is what the dialler reports, saying it is most likely a certificate
the peer does not trust.  The listener's TLS layer refuses such connections before kvstore sees
them, so it records nothing about them (its peers' status says it).

Files are read when the node starts; a missing or malformed one is a ``ConfigError`` naming the field.
"""

from __future__ import annotations

import ssl

from kvstore.config import ConfigError, TLSSettings


def _load_chain(context: ssl.SSLContext, tls: TLSSettings) -> None:
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except FileNotFoundError as exc:
        field = "tls.cert_file" if exc.filename in (None, tls.cert_file) else "tls.key_file"
        raise ConfigError(field, f"cannot read {exc.filename or tls.cert_file}: {exc.strerror}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("tls.cert_file", f"{tls.cert_file} with key {tls.key_file} is not usable: {exc}") from None


def _load_ca(context: ssl.SSLContext, ca_file: str, field: str = "tls.ca_file") -> None:
    try:
        context.load_verify_locations(cafile=ca_file)
    except FileNotFoundError:
        raise ConfigError(field, f"cannot read {ca_file}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(field, f"{ca_file} is not a PEM CA certificate: {exc}") from None


def http_server_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """The HTTPS context of the client API (None: plain HTTP)."""
    if not (tls.enabled and tls.http):
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_chain(context, tls)
    return context


def peer_contexts(tls: TLSSettings) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """(listening, dialling) contexts of the peer port: mutual TLS against the CA, or (None, None)."""
    if not (tls.enabled and tls.peer):
        return None, None
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.minimum_version = ssl.TLSVersion.TLSv1_2
    server.verify_mode = ssl.CERT_REQUIRED  # a peer without a certificate from our CA never gets to the hello
    _load_ca(server, tls.ca_file)
    _load_chain(server, tls)
    # PROTOCOL_TLS_CLIENT: check_hostname and CERT_REQUIRED; only our CA, never the system's store.
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_ca(client, tls.ca_file)
    _load_chain(client, tls)  # our certificate, which the listener requires
    return server, client


def client_context(ca_file: str | None) -> ssl.SSLContext | None:
    """What a client uses to verify HTTPS nodes: the given CA (None: the system's trust store)."""
    context = ssl.create_default_context()
    if ca_file:
        _load_ca(context, ca_file, "cacert")
    return context
