"""Limits and fixed numbers, each with its unit and the reason it exists.

Caps against hostile peers live here so a reader can audit them in one place.
"""

from __future__ import annotations

# --- HTTP surface -----------------------------------------------------------
DEFAULT_HTTP_PORT = 38883
"""First port tried by the HTTP transport (the reference's ``httpBasePort``)."""

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
"""bytes; requests larger than this get 413 before they are parsed."""

API_PATH = "/v1"
MESH_PATH = "/v1/dvai"

# --- Engine -----------------------------------------------------------------
DEFAULT_CTX_SIZE = 4096
"""tokens; 1024 (a common default elsewhere) is too small for agent prompts."""

DEFAULT_QUEUE_DEPTH = 16
"""requests waiting per model before new ones get 503 + Retry-After."""

DEFAULT_PARALLEL = 4
"""sequences a generative model decodes together (its context holds ctx_size × parallel tokens)."""

DEFAULT_PROMPT_CACHE_MIB = 256
"""MiB of host memory a generative model keeps finished sequences' KV state in (the RAM prompt cache)."""

MAX_CHOICES = 16
"""``n`` a request may ask for; a model serves at most its ``parallel`` choices per request."""

MAX_TOP_LOGPROBS = 20
"""``top_logprobs`` (chat) alternatives per token."""

MAX_COMPLETION_LOGPROBS = 5
"""``logprobs`` (legacy completions) alternatives per token, as OpenAI allows."""

DEFAULT_GENERATION_TIMEOUT = 60.0
"""seconds a single generation may run before it is ended with an error."""

DEFAULT_MAX_BLANK_CHUNKS = 20
"""consecutive tokens that add no visible text before a generation is ended."""

QUEUE_RETRY_AFTER = 2
"""seconds suggested to a client refused because a model queue is full."""

MAX_TOKENS_CAP = 1 << 20
"""tokens; an upper bound on max_tokens values we accept at all."""

JSON_MAX_DEPTH = 64
"""arrays/objects a request body may nest in one another; OpenAI bodies need about 6."""

JSON_MAX_NUMBER_CHARS = 100
"""characters of one number literal in a request body (a 64-bit integer has at most 20)."""

IDLE_CONNECTION_TIMEOUT_S = 30.0
"""seconds a connection may sit with no request in progress (never sent one, sent half of one, or
kept alive after its last answer) before the node closes it; a request being served never is."""

AUDIT_COMMIT_WAIT_S = 2.0
"""seconds a JSON answer waits for its audit row to be committed before it is sent anyway."""

KEEP_ALIVE_MAX_S = 10 * 365 * 86400.0
"""seconds; a request's larger ``keep_alive`` is refused (a negative one keeps the model loaded)."""

# --- Offload ----------------------------------------------------------------
OFFLOAD_HEADER = "X-DVAI-Offload"
SERVED_BY_HEADER = "X-DVAI-Served-By"
SUBSTITUTED_HEADER = "X-DVAI-Substituted-From"
"""on an answer served by another model than the one asked for (hub substitution): the name asked for."""
HOP_HEADER = "X-DVAI-Hop"
LINK_PEER_HEADER = "X-DVAI-Link-Peer"
"""set by the node itself on requests it replays from a WebRTC link (never trusted from the network)."""
REQUEST_ID_HEADER = "X-Request-Id"
NO_CAPABLE_DEVICE_RETRY_AFTER = 30
"""seconds, fixed by the reference's no_capable_device contract."""

# --- Signing ----------------------------------------------------------------
SIGNATURE_WINDOW_S = 300
"""seconds a signed request's nonce timestamp may differ from our clock."""

NONCE_CACHE_MAX = 100_000
"""nonces remembered for replay detection; bounds memory a flood can force."""

# --- Signed requests: input caps ----------------------------------------------
SIGNED_HEADER_MAX_CHARS = 128
"""characters in X-DVAI-Peer-Device-Id / X-DVAI-App-Id; longer values are refused, not truncated."""

NONCE_MAX_CHARS = 96
"""characters in an X-DVAI-Nonce; bounds the memory each remembered nonce costs."""

# --- Pairing ------------------------------------------------------------------
PAIRING_KEY_BYTES = 32
"""bytes in a pairing key (256-bit HMAC-SHA256 secret, as the reference's pairingKey)."""

PAIRINGS_MAX = 10_000
"""pairings kept in pairings.json; a store this size is an attack or a mistake, not a household."""

PAIRING_FIELD_MAX_CHARS = 128
"""characters in a handshake's peerDeviceId / peerDeviceName / appId."""

HANDSHAKE_BURST = 5
"""handshakes one peer id or one address may send back to back before 429 (refilled at
SecurityConfig.handshake_rate_per_minute)."""

HANDSHAKE_TRACKED_MAX = 4096
"""peer ids + addresses whose handshake rate we track; when full every handshake gets 429
until buckets refill, so a flood of spoofed ids cannot grow memory."""

PAIRING_PENDING_MAX = 32
"""pairing requests awaiting a human (prompt policy or hook) at once; more get 429."""

PAIRING_PROMPT_TIMEOUT_S = 120.0
"""seconds a pending pairing request waits for approve/deny before it is denied."""

PAIRING_CLIENT_TIMEOUT_S = PAIRING_PROMPT_TIMEOUT_S + 30.0
"""seconds `dvai-node pair` waits for the peer's answer: longer than the peer's prompt timeout."""

# --- Audit log ----------------------------------------------------------------
AUDIT_QUEUE_MAX = 10_000
"""audit rows waiting for the writer thread; beyond this rows are dropped (and counted) rather
than blocking the event loop or growing memory."""

AUDIT_BATCH_MAX = 500
"""rows the writer thread commits in one transaction."""

AUDIT_PRUNE_INTERVAL_S = 60.0
"""seconds between retention passes (age and row count) on the writer thread."""

AUDIT_QUERY_MAX_ROWS = 10_000
"""rows one audit query may return."""
AUDIT_CLI_DEFAULT_ROWS = 50
"""rows ``dvai-node audit`` shows unless ``--limit`` says otherwise."""

AUDIT_FIELD_MAX_CHARS = 256
"""characters kept of each text column (ids, model names); hostile values are truncated."""

# --- Offload policy and peer health -------------------------------------------
OFFLOAD_OBSERVED_MAX_AGE_S = 120.0
"""seconds an observed (measured on real forwarded requests) peer rate outranks the
verified probe figure; older than this, the verified figure is used again."""

OFFLOAD_MAX_FORWARD_ATTEMPTS = 3
"""peers tried for one request before the first byte (best + 2 fallbacks); bounds the
time a client waits when several peers fail in a row."""

CIRCUIT_BREAK_MAX_S = 600.0
"""seconds; cap on the exponential back-off of a repeatedly failing peer's circuit."""

CIRCUIT_BREAK_MULTIPLIER = 2.0
"""each consecutive failure multiplies the open period by this (30 s, 60 s, 120 s, …)."""

CIRCUIT_TRIAL_TIMEOUT_S = 90.0
"""seconds a half-open trial request may stay unreported before another trial is let
through (a leaked attempt must not block a peer forever); above the generation timeout."""

OBSERVED_RATE_ALPHA = 0.3
"""EWMA weight of the newest observed tok/s sample (see node/offload/breaker.py)."""

OBSERVED_MIN_TOKENS = 8
"""tokens; shorter responses are too noisy to update a peer's observed tok/s."""

MAX_TRACKED_PEERS = 1024
"""peers whose health counters are kept; bounds memory a flood of device ids can force."""

# --- Discovery (mDNS, static, custom, health) ---------------------------------
MDNS_SERVICE_TYPE = "_dvai._tcp.local."
MDNS_TXT_FORMAT_VERSION = "1"
"""value of the ``v`` TXT key; bumped when the TXT fields change meaning."""

MAX_PEERS = 256
"""peer table entries; bounds the memory a LAN full of (fake) devices can force."""

MAX_PENDING_PEERS = 64
"""entries never yet confirmed by a health answer; a flood of fake announcements
churns only these slots and cannot push out confirmed peers."""

MAX_PEER_ADDRESSES = 4
"""verified alternate addresses kept per peer (LAN + VPN, IPv4 + IPv6)."""

MAX_PEER_MODELS = 64
"""models kept per peer from a TXT record or a health answer; extra ones are dropped."""

MAX_MODEL_ID_CHARS = 128
"""characters in one advertised model id; longer ids are dropped."""

MAX_DEVICE_NAME_CHARS = 63
"""characters of a device name we keep, a peer's or our own (the DNS-SD instance label limit:
63 bytes; longer names are cut)."""

MAX_VERSION_CHARS = 32
"""characters of a peer's version string we keep."""

MAX_CLAIMED_TOK_PER_S = 100_000.0
"""tokens/s; a peer claiming more (or a negative, NaN or infinite rate) is not believed."""

MAX_CLAIMED_QUEUE_DEPTH = 1_000_000
"""requests; a larger claimed queue depth is not believed."""

MAX_TXT_BYTES = 1300
"""bytes of a whole TXT record we accept or send (RFC 6763 §6.2: fits one packet)."""

MAX_TXT_ITEM_BYTES = 255
"""bytes of one ``key=value`` TXT string (RFC 6763 §6.1: one length byte)."""

MAX_TXT_ITEMS = 64
"""``key=value`` strings per TXT record we look at."""

MDNS_RESOLVE_TIMEOUT_S = 1.5
"""seconds to wait for a service's SRV/TXT/A records after it is announced."""

MAX_CONCURRENT_RESOLVES = 16
"""mDNS resolutions in flight at once; more announcements wait or are dropped."""

MAX_TRACKED_SERVICES = 512
"""mDNS service names remembered (name → device id) so a goodbye can be matched."""

MDNS_UPDATE_MIN_INTERVAL_S = 2.0
"""seconds between two TXT re-announcements; faster changes are coalesced (queue depth
moves quickly, and every announcement is several multicast packets)."""

HEALTH_CHECK_TIMEOUT_S = 1.0
"""seconds one health request may take (capped by the health interval)."""

MAX_HEALTH_BODY_BYTES = 64 * 1024
"""bytes of a health answer we read; a larger answer counts as a failed check."""

MAX_CONCURRENT_HEALTH_CHECKS = 32
"""health requests in flight at once, so many dead peers cannot stall a round."""

HEALTH_POKE_MIN_INTERVAL_S = 0.2
"""seconds; an immediate out-of-round check of one address happens at most this often."""

MAX_CUSTOM_PEERS = 64
"""peers taken from one custom discovery call; the rest are dropped with a warning."""

CUSTOM_DISCOVERY_TIMEOUT_S = 10.0
"""seconds a custom discovery call may take (capped by its interval)."""

MAX_WARNING_KEYS = 1024
"""distinct (source, problem) pairs remembered to log a warning once, then at debug."""

MAX_PEER_WATCH_QUEUE = 256
"""change events buffered per ``PeerTable.watch()`` consumer; older ones are dropped."""

# --- Capability (local tok/s scores) --------------------------------------------
CAPABILITY_PROBE_MAX_TOKENS = 1024
"""tokens one probe may ask for; bounds how long a probe holds its model's queue."""

CAPABILITY_PROBE_LEVEL_MIN_TOKENS = 8
"""decode tokens per sequence at least when the probe measures a concurrency level above 1
(it runs about ``probe_tokens ÷ 2`` in all per level; see ``node.capability.probe.level_tokens``)."""

CAPABILITY_OBSERVED_ALPHA = 0.25
"""EWMA weight of the newest served decode rate in the local ``observed`` score: a step
change is 90 % reflected after 8 requests (1 − 0.75⁸), while one odd request moves the
score by only a quarter of its deviation."""

CAPABILITY_NOTIFY_MIN_CHANGE = 0.05
"""relative change in a model's tok/s before capability subscribers (mDNS re-advertising)
are told; smaller drifts from served traffic would only cause multicast churn."""

CAPABILITY_MAX_TOK_PER_S = 100_000.0
"""tok/s above which a rate is treated as garbage (from disk or a broken timer)."""

CAPABILITY_CURVE_MAX_POINTS = 8
"""points kept from a capability curve (aggregate tok/s by concurrency) another device sends us."""

CAPABILITY_CURVE_MAX_CONCURRENCY = 256
"""highest concurrency level accepted in a capability curve."""

CAPABILITY_STORE_MAX_ENTRIES = 256
"""(model id, library version) scores kept in capability.json; the oldest go first."""

CAPABILITY_FILE_MAX_BYTES = 1 << 20
"""bytes; a larger capability.json is ignored (it is not ours, or it was tampered with)."""

PROBE_UNEVEN_RATIO = 1.5
"""a probe whose median token gap implies a rate this many times its overall rate was
disturbed: some tokens waited (another process took the cores) and the mean is not the
device's speed. A quiet run's ratio is close to 1 (decode steps take near-equal time)."""

PROBE_BELOW_HEURISTIC_RATIO = 0.25
"""a probe below this fraction of the bandwidth heuristic is suspect: the heuristic is rough
(docs/capability.md: probes land at 0.6-1.6x it) but not 4x too high on a quiet machine."""

PROBE_BELOW_PREVIOUS_RATIO = 0.5
"""a probe below this fraction of the previous stored probe of the same model is suspect."""

PROBE_RETRY_DELAYS_S = (30.0, 120.0)
"""seconds before re-measuring a start-up probe that looked disturbed; after the last, the best
figure measured is kept (with a warning)."""

# --- Metrics (GET /metrics) -----------------------------------------------------
# Prometheus keeps every label value it has seen for the life of the process: a label
# whose values come from the network needs a cap. Past a cap, values share "other".
MAX_METRIC_PEER_LABELS = 32
"""distinct peer device ids with their own ``peer`` label in the offload metrics; each costs
4 series for the life of the process, so a churning LAN cannot grow the scrape without bound."""

MAX_METRIC_REMOTE_MODELS = 16
"""distinct model ids served by peers (unknown to this node) with their own ``model`` label."""

MAX_METRIC_ERROR_CODES = 64
"""distinct error ``code`` label values (ours are a fixed set; relayed peer codes are not)."""

MAX_METRIC_LABEL_CHARS = 128
"""characters of one label value; longer values are cut."""

# --- Offload: verification probes and forwarding --------------------------------
VERIFY_PROBE_TOKENS = 32
"""tokens a verification probe asks a peer for: 31 timed intervals give a rate within a few
per cent on a LAN, and cost a 40 tok/s peer under a second of its engine."""

VERIFY_MIN_TOKENS = 4
"""content events a probe must deliver before its rate counts (fewer: inconclusive)."""

MAX_CONCURRENT_VERIFICATIONS = 4
"""verification probes in flight at once; more wait their turn, so a LAN full of peers
cannot make this node open unbounded connections or spend a peer's engine all at once."""

VERIFY_RETRY_AFTER_S = 30.0
"""seconds before a peer whose probe was inconclusive (too few tokens, a bad stream) is
probed again; a peer that refused the connection is circuit-broken instead."""

VERIFY_REFRESH_FRACTION = 0.8
"""a verification older than this fraction of ``verify_max_age`` is renewed in the
background while the peer keeps serving, so a busy route never waits for a re-probe."""

MAX_VERIFICATIONS = 4096
"""(peer, model) verification results kept; bounds memory a flood of device ids can force."""

FORWARD_MAX_RESPONSE_BYTES = 16 * 1024 * 1024
"""bytes of a non-streamed answer we take from a peer; more is a broken or hostile peer."""

FORWARD_MAX_EVENT_BYTES = 1024 * 1024
"""bytes of one server-sent event from a peer (a token is a few hundred bytes at most)."""

HANDSHAKE_PROOFS_REMEMBERED = 10_000
"""handshake device proofs remembered for replay detection (handshakes are rate-limited, so a
full window rarely holds more than a few hundred)."""

# --- Caps on hostile input gathered from the modules that enforce them ----------

# Request parsing (node/api/schemas.py)
MAX_STOP_SEQUENCES = 4
"""stop strings per request (OpenAI's own limit); each is checked against every token."""

MAX_COMPLETION_PROMPTS = 16
"""prompts in one /v1/completions request; each becomes a generation in the model's queue."""

MAX_EMBEDDING_INPUTS = 2048
"""inputs in one /v1/embeddings request (OpenAI's own limit); bounds one request's engine time."""

EMBEDDING_BATCH_MAX_TOKENS = 2048
"""tokens per embedding batch (and so the longest input), when the model's ``ctx_size`` is larger."""

# Discovery: what a peer tells us about itself (node/discovery/)
MAX_INSTANCE_ID_CHARS = 64
"""characters of a peer's instance id (from its TXT record or health answer); ours are 16 hex
characters. One value for both sources, so the two never disagree about the same peer."""

MAX_API_PATH_CHARS = 64
"""characters of the API path a peer advertises (ours is ``/v1``)."""

MAX_URL_CHARS = 2048
"""characters of a peer base URL we accept (from config, custom discovery or an advert)."""

HEALTH_CHALLENGE_MAX_CHARS = 64
"""hex characters of the ``challenge`` query parameter a health handler signs; bounds the
signed message a caller can make us produce."""

# Offload forwarding (node/offload/forward.py)
FORWARD_ERROR_PEEK_BYTES = 4096
"""bytes of a peer's error answer read for the log line; the rest is not read."""

# QR pairing (node/security/qr_pairing.py, qr_service.py, rendezvous_client.py)
QR_MIN_SECRET_BYTES = 16
"""bytes of a QR's one-time secret at least (128 bits: the pairing key's salt must be unguessable)."""

QR_MAX_SECRET_BYTES = 64
"""bytes of a QR's one-time secret at most; a longer one is not ours."""

QR_MAX_URI_CHARS = 2048
"""characters of a pairing URI we parse at all; a real one is about 250."""

QR_MAX_DEVICE_NAME_BYTES = 128
"""UTF-8 bytes of a device name carried in a confirmation message."""

QR_MAX_CONFIRMATION_CHARS = 2048
"""characters of a key-confirmation message we parse at all; a real one is about 330."""

QR_MAX_PENDING_OFFERS = 4
"""QR sessions one node keeps open at once; each holds a long-poll on the rendezvous."""

QR_MAX_REMEMBERED_OUTCOMES = 32
"""finished QR offers whose outcome ``status()`` still reports; older ones are forgotten."""

RENDEZVOUS_MAX_RESPONSE_BYTES = 64 * 1024
"""bytes of a rendezvous response we read; a real one is under 4 KiB."""

# Small fields decoded or kept from the network
REQUEST_ID_MAX_CHARS = 128
"""characters of a client's X-Request-Id kept (and relayed to a peer); longer ids are cut."""

B64_KEY_MAX_CHARS = 64
"""characters of a base64url 32-byte key we decode at all (43 unpadded, 44 padded): a pairing
key, a health proof's public key."""

B64_FIELD_MAX_CHARS = 128
"""characters of a base64url key or signature field we decode at all (a 64-byte Ed25519
signature is 86 unpadded, 88 padded): handshake and health proofs."""

QR_MAX_B64_FIELD_CHARS = 200
"""characters of one base64url field (key, signature, MAC) in a QR key-confirmation message."""

HEALTH_POKE_TRACKED_MAX = 1024
"""addresses whose last out-of-round health check time is remembered; past this, entries
older than 10 s are dropped, so a flood of addresses cannot grow the table."""

CAPABILITY_MODEL_ID_MAX_CHARS = 256
"""characters of a model id in capability.json or a probe request; longer ones are refused."""

CAPABILITY_VERSION_MAX_CHARS = 64
"""characters of the inference library version stored with a capability score."""

# API keys (node/hub/keys.py)
MAX_API_KEYS = 10_000
"""API keys kept at most: bounds the file and the lookup table an admin mistake can grow."""

MAX_KEY_NAME_CHARS = 100
"""characters of an API key's human-readable name."""

# Quotas and usage accounting (node/hub/quotas.py, node/hub/usage.py)
QUOTA_MAX_TRACKED_SUBJECTS = 100_000
"""(rule, app, device, model) quota windows kept: bounds the memory many distinct callers can grow."""

USAGE_LABEL_MAX_CHARS = 200
"""characters of an app id, device id or model name kept in a usage row; longer values are cut."""

# --- The internet path: data-channel frames and links (node/transport) ----------------
LINK_MAX_FRAME_BYTES = 64 * 1024
"""bytes of one serialized frame on a data channel: the message size every WebRTC stack
accepts (aiortc advertises 256 KiB), and what bounds one frame's buffer at the reader."""

LINK_MAX_CHUNK_BYTES = 60 * 1024
"""bytes of body carried by one chunk frame (leaves room for the frame's map and tags)."""

LINK_MAX_HEADERS = 64
"""headers in one request or response head."""

LINK_MAX_HEADER_BYTES = 16 * 1024
"""characters of all header names and values of one head together."""

LINK_MAX_PATH_CHARS = 8 * 1024
"""characters of a request head's path with query."""

LINK_MAX_ERROR_MESSAGE_CHARS = 1024
"""characters of a stream error's message."""

LINK_MAX_STREAM_ID = 2**31 - 1
"""largest stream id; a link that would need more is closed and opened afresh."""

LINK_MAX_STREAMS = 64
"""streams open at once on one link per direction; a peer opening more is hostile (the
link is closed): it bounds the tasks and buffers one peer can make us hold."""

LINK_MAX_STREAM_BUFFER_BYTES = 4 * 1024 * 1024
"""bytes received on one stream and not yet read by its consumer; past this the stream is
refused (a request body larger than the body limit, or a peer ignoring cancellation)."""

LINK_MAX_INBOUND_BODY_BYTES = 16 * 1024 * 1024
"""bytes of request bodies one peer may have in flight to us on a link at once (all its streams);
more closes the link: bounds what 64 streams of large bodies could pin in memory."""

LINK_SEND_HIGH_WATER_BYTES = 1024 * 1024
"""bytes queued in the channel (``bufferedAmount``) above which a sender waits."""

LINK_SEND_LOW_WATER_BYTES = 256 * 1024
"""bytes queued in the channel at which waiting senders resume (the low-water event)."""

LINK_MAX_SIGNAL_BYTES = 48 * 1024
"""bytes of one encrypted signaling message (an SDP with its candidates is 1-4 KiB);
under the rendezvous' relay limit of 64 KiB."""

REMOTE_HEALTH_MAX_AGE_S = 600.0
"""seconds a rendezvous peer's health answer is used before one is fetched over a new link."""

PRESENCE_BACKOFF_MAX_S = 60.0
"""seconds between reconnection attempts to the rendezvous at most (a restart is found within a minute)."""

MAX_PRESENCE_QUERY = 64
"""rendezvous-paired peers a node watches (one presence query; the rendezvous' limit per query)."""
# Tools and structured outputs (node/engine/grammar.py, node/engine/tools.py, node/api/tool_params.py)
MAX_TOOLS = 128
"""function tools per request (OpenAI's own limit): bounds the prompt and the call grammar."""

MAX_PARALLEL_CALLS = 4
"""calls a forced (``required``) output may hold with ``parallel_tool_calls``: a small model could
otherwise repeat calls until ``max_tokens``."""

GRAMMAR_MAX_DIGITS = 16
"""integral digits a grammar-generated number may have: bounds a small model's runaway digit loop."""

GRAMMAR_MAX_FRACTION_DIGITS = 15
"""fraction digits a grammar-generated number may have, for the same reason."""

GRAMMAR_MAX_ITEMS_EXPANDED = 64
"""``minItems``/``maxItems`` accepted in a schema: GBNF expands each bounded repetition."""

GRAMMAR_MAX_SCHEMA_DEPTH = 32
"""nesting levels of a JSON schema turned into a grammar: bounds recursion on hostile input."""

GRAMMAR_MAX_RULES = 2000
"""rules one grammar may have: bounds the work a hostile schema can ask of llama.cpp's parser."""

MAX_MODEL_FEATURES = 16
"""feature names per model read from a peer's health report; more are dropped."""
