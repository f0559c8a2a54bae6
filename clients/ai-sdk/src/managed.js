// Managed mode: join or spawn a shared `dvai-node serve` through the managed-serve registry.
//
// The registry (records, lock, supervisor) is the one Python's `managed_node()` uses:
// this module joins and leaves it by running `dvai-node managed attach|detach`, which
// take the registry's flock(2) lock and write the same records with this process as
// the consumer. So a Python app and a JS tool asking for the same models share one serve.

import { execFile } from 'node:child_process'
import { accessSync, constants as fsConstants, realpathSync, statSync } from 'node:fs'
import path from 'node:path'

import { buildProvider, DEFAULT_API_KEY } from './index.js'
import {
  BinaryNotFoundError,
  DvaiManagedModeError,
  ERRORS_BY_CODE,
  ServeSpawnFailedError,
  ServeStartTimeoutError
} from './errors.js'

const DEFAULT_START_TIMEOUT_MS = 180_000
const DEFAULT_IDLE_TIMEOUT_MS = 300_000
/** Extra time for the attach command itself (a Python start-up and the registry lock). */
const ATTACH_SLACK_MS = 60_000

/**
 * @typedef {import('./index.js').DvaiCallableProvider & {
 *   port: number, pid: number, serveId: string, models: string[], defaultModel: string,
 *   spawned: boolean, close: () => Promise<void>, [Symbol.asyncDispose]: () => Promise<void>
 * }} ManagedDvaiProvider
 */

/**
 * @typedef {object} Attachment
 * @property {string} base_url
 * @property {number} port
 * @property {number} pid
 * @property {string} serve_id
 * @property {string} handle
 * @property {string[]} models
 * @property {string} default_model
 * @property {boolean} spawned
 */

/**
 * @param {import('./index.js').DvaiManagedOptions} options
 * @returns {Promise<ManagedDvaiProvider>}
 */
export async function createManagedDvai (options) {
  if (!Array.isArray(options.models)) throw new TypeError('managed mode needs a models array')
  const binary = resolveBinary(options.serveBinPath)
  const spec = {
    models: options.models,
    host: options.serveHost,
    port: options.servePort,
    start_timeout: (options.serveStartTimeout ?? DEFAULT_START_TIMEOUT_MS) / 1000,
    binary,
    reuse: options.reuse,
    idle_timeout: (options.serveIdleTimeout ?? DEFAULT_IDLE_TIMEOUT_MS) / 1000,
    registry_dir: options.registryDir
  }
  const timeoutMs = (options.serveStartTimeout ?? DEFAULT_START_TIMEOUT_MS) + ATTACH_SLACK_MS
  let current = await attach(binary, spec, timeoutMs)
  let closed = false
  /** @type {Promise<void> | null} */
  let reattaching = null
  const baseFetch = options.fetch ?? globalThis.fetch

  /** @param {Attachment} stale */
  const reattach = async (stale) => {
    if (current !== stale) return // another request already moved on
    reattaching ??= (async () => {
      try {
        const fresh = await attach(binary, spec, timeoutMs)
        current = fresh
        await detach(binary, stale, spec.registry_dir).catch(() => {})
      } finally {
        reattaching = null
      }
    })()
    await reattaching
  }

  /**
   * Sends to the current serve; a request that meets *connection refused* (the serve is gone)
   * re-resolves the serve and is sent once more. Nothing else is retried, so a request the
   * serve had begun is never replayed.
   * @type {typeof fetch}
   */
  const managedFetch = async (input, init) => {
    const used = current
    try {
      return await baseFetch(retarget(input, used.base_url), init)
    } catch (error) {
      if (closed || !connectionRefused(error)) throw error
    }
    await reattach(used)
    return baseFetch(retarget(input, current.base_url), init)
  }

  /** @type {any} */
  const provider = buildProvider({
    baseURL: current.base_url,
    apiKey: options.apiKey ?? DEFAULT_API_KEY,
    headers: options.headers ?? {},
    fetch: managedFetch
  })
  Object.defineProperties(provider, {
    baseURL: { get: () => current.base_url, enumerable: true },
    port: { get: () => current.port, enumerable: true },
    pid: { get: () => current.pid, enumerable: true },
    serveId: { get: () => current.serve_id, enumerable: true },
    models: { get: () => [...current.models], enumerable: true },
    defaultModel: { get: () => current.default_model, enumerable: true },
    spawned: { get: () => current.spawned, enumerable: true },
    closed: { get: () => closed, enumerable: true }
  })
  /** Detach this session. A serve other consumers use keeps running; an unused shared serve
   *  is reaped after the idle timeout, a dedicated one at once. */
  provider.close = async () => {
    if (closed) return
    closed = true
    await detach(binary, current, spec.registry_dir)
  }
  provider[Symbol.asyncDispose] = provider.close
  return provider
}

/**
 * The `dvai-node` executable: `serveBinPath`, else `dvai-node` on PATH.
 * @param {string | undefined} given
 * @returns {string}
 */
export function resolveBinary (given) {
  const candidates = given !== undefined
    ? [given]
    : (process.env.PATH ?? '').split(path.delimiter).filter(Boolean).map((dir) => path.join(dir, 'dvai-node'))
  for (const candidate of candidates) {
    try {
      if (!statSync(candidate).isFile()) continue
      accessSync(candidate, fsConstants.X_OK)
      return realpathSync(candidate)
    } catch {
      // not this one
    }
  }
  throw new BinaryNotFoundError(given !== undefined
    ? `dvai-node binary not found or not executable: ${given}`
    : 'dvai-node is not on PATH (pip install dvai-mesh, or pass serveBinPath)')
}

/**
 * @param {string} binary
 * @param {Record<string, unknown>} spec
 * @param {number} timeoutMs
 * @returns {Promise<Attachment>}
 */
async function attach (binary, spec, timeoutMs) {
  const args = ['managed', 'attach', '--spec', JSON.stringify(spec), '--consumer-pid', String(process.pid)]
  const { code, stdout, stderr, error } = await run(binary, args, timeoutMs)
  if (error !== undefined) {
    if (/** @type {any} */ (error).killed) {
      throw new ServeStartTimeoutError(`dvai-node managed attach did not finish in ${timeoutMs} ms`, { cause: error })
    }
    if (/** @type {any} */ (error).code === 'ENOENT') {
      throw new BinaryNotFoundError(`dvai-node binary not found: ${binary}`, { cause: error })
    }
    if (typeof code !== 'number') {
      throw new ServeSpawnFailedError(`cannot run ${binary}: ${error.message}`, { cause: error })
    }
  }
  const answer = lastJsonLine(stdout)
  if (answer !== null && code === 0 && typeof answer.base_url === 'string') return /** @type {Attachment} */ (answer)
  const failure = answer?.error
  if (failure && typeof failure.code === 'string') {
    const ErrorClass = ERRORS_BY_CODE[failure.code]
    if (ErrorClass !== undefined) throw new ErrorClass(failure.message)
    throw new DvaiManagedModeError(failure.message, failure.code)
  }
  throw new ServeSpawnFailedError(`dvai-node managed attach failed (exit ${code}): ${stderr.trim() || stdout.trim()}`)
}

/**
 * @param {string} binary
 * @param {Attachment} attachment
 * @param {unknown} registryDir
 */
async function detach (binary, attachment, registryDir) {
  const args = ['managed', 'detach', '--serve-id', attachment.serve_id, '--handle', attachment.handle]
  if (typeof registryDir === 'string') args.push('--registry-dir', registryDir)
  const { code, stderr } = await run(binary, args, 60_000)
  if (code !== 0) throw new Error(`dvai-node managed detach failed (exit ${code}): ${stderr.trim()}`)
}

/**
 * @param {string} binary
 * @param {string[]} args
 * @param {number} timeoutMs
 * @returns {Promise<{ code: number | null, stdout: string, stderr: string, error?: Error }>}
 */
function run (binary, args, timeoutMs) {
  // DVAI_* variables configure a node; the managed serve's config is its model list alone.
  const env = Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('DVAI_')))
  return new Promise((resolve) => {
    execFile(binary, args, { env, timeout: timeoutMs, maxBuffer: 1 << 20 }, (error, stdout, stderr) => {
      const code = error === null ? 0 : (typeof /** @type {any} */ (error).code === 'number' ? /** @type {any} */ (error).code : null)
      resolve({ code, stdout: String(stdout), stderr: String(stderr), error: error ?? undefined })
    })
  })
}

/** @param {string} text */
function lastJsonLine (text) {
  const lines = text.trim().split('\n').reverse()
  for (const line of lines) {
    try {
      const value = JSON.parse(line)
      if (value !== null && typeof value === 'object') return value
    } catch {
      // a log line
    }
  }
  return null
}

/**
 * The request, sent to the serve at `baseURL` (the serve may have moved to another port).
 * @param {Parameters<typeof fetch>[0]} input
 * @param {string} baseURL
 */
function retarget (input, baseURL) {
  const target = new URL(baseURL)
  const url = new URL(typeof input === 'string' ? input : input instanceof URL ? input.href : input.url)
  url.protocol = target.protocol
  url.host = target.host
  if (typeof input === 'string' || input instanceof URL) return url.href
  return new Request(url.href, input)
}

/**
 * Whether a fetch failure is a refused TCP connection (nothing reached the serve).
 * @param {unknown} error
 */
export function connectionRefused (error) {
  /** @type {unknown[]} */
  const stack = [error]
  const seen = new Set()
  while (stack.length > 0) {
    const current = /** @type {any} */ (stack.pop())
    if (current === null || typeof current !== 'object' || seen.has(current)) continue
    seen.add(current)
    if (current.code === 'ECONNREFUSED') return true
    if (current.cause !== undefined) stack.push(current.cause)
    if (Array.isArray(current.errors)) stack.push(...current.errors)
  }
  return false
}
