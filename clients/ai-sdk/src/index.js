// Vercel AI SDK provider for dvai-mesh nodes: a thin wrapper around
// @ai-sdk/openai-compatible, pointed at a `dvai-node serve` you run yourself
// (external mode) or one spawned, shared and reaped for you (managed mode).

import { createOpenAICompatible } from '@ai-sdk/openai-compatible'

export * from './errors.js'

/** The port `dvai-node serve` listens on by default. */
export const DEFAULT_BASE_URL = 'http://127.0.0.1:38883/v1'
/** A loopback node does not check the key; some clients refuse to send none. */
export const DEFAULT_API_KEY = 'dvai'
/** The request header that says where a request may run (docs/offload.md). */
export const OFFLOAD_HEADER = 'X-DVAI-Offload'
/** @type {readonly OffloadMode[]} */
export const OFFLOAD_MODES = Object.freeze(['prefer', 'never', 'require'])

/**
 * Where a request may run: `prefer` (the default: a faster paired peer if one qualifies),
 * `never` (this device only), `require` (a peer or a 503 `no_capable_device`).
 * @typedef {'prefer' | 'never' | 'require'} OffloadMode
 */

/**
 * @typedef {object} DvaiExternalOptions
 * @property {'external'} [mode] the default
 * @property {string} [baseURL] default DEFAULT_BASE_URL
 * @property {string} [apiKey] default 'dvai'
 * @property {Record<string, string>} [headers]
 * @property {typeof fetch} [fetch]
 */

/**
 * @typedef {object} DvaiManagedModel
 * @property {string} name catalogue constant name (`dvai-node models --catalog`) or served id
 * @property {Record<string, unknown>} [config] `[models.<alias>]` keys written verbatim into the
 *   serve's config (ctx_size, reasoning_budget, embedding, engine, ...)
 * @property {boolean} [preload] load at start; default true
 * @property {boolean} [default] make this the default model (at most one)
 * @property {string} [alias] the id it is served under; default the catalogue id
 */

/**
 * @typedef {object} DvaiManagedOptions
 * @property {'managed'} mode
 * @property {(string | DvaiManagedModel)[]} models the first is the default unless one says `default: true`
 * @property {number} [servePort] default: a free port (pinning it turns reuse off)
 * @property {string} [serveHost] default '127.0.0.1'
 * @property {number} [serveStartTimeout] ms to wait for health; default 180000
 * @property {string} [serveBinPath] the `dvai-node` executable; default: `dvai-node` on PATH
 * @property {boolean} [reuse] share a matching serve; default true (false if servePort is pinned)
 * @property {number} [serveIdleTimeout] ms a shared serve outlives its last consumer; default 300000
 * @property {string} [apiKey]
 * @property {Record<string, string>} [headers]
 * @property {typeof fetch} [fetch]
 * @property {string} [registryDir] default: `<user state dir>/dvai-mesh/managed-serves`
 */

/**
 * @typedef {object} DvaiModelSettings
 * @property {OffloadMode} [offload] sent as `X-DVAI-Offload` with every call of this model
 */

/**
 * @typedef {object} DvaiProvider
 * @property {string} baseURL
 * @property {(modelId: string, settings?: DvaiModelSettings) => import('@ai-sdk/provider').LanguageModelV3} chatModel
 * @property {(modelId: string, settings?: DvaiModelSettings) => import('@ai-sdk/provider').LanguageModelV3} languageModel
 * @property {(modelId: string, settings?: DvaiModelSettings) => import('@ai-sdk/provider').LanguageModelV3} completionModel
 * @property {(modelId: string) => import('@ai-sdk/provider').EmbeddingModelV3} embeddingModel
 * @property {(modelId: string) => import('@ai-sdk/provider').EmbeddingModelV3} textEmbeddingModel
 */

/**
 * @typedef {DvaiProvider & ((modelId: string, settings?: DvaiModelSettings) => import('@ai-sdk/provider').LanguageModelV3)} DvaiCallableProvider
 */

/**
 * Headers for one call: `generateText({ model, prompt, headers: offloadHeaders('never') })`.
 * @param {OffloadMode} mode
 * @returns {Record<string, string>}
 */
export function offloadHeaders (mode) {
  return { [OFFLOAD_HEADER]: checkOffload(mode) }
}

/**
 * @param {unknown} mode
 * @returns {OffloadMode}
 */
function checkOffload (mode) {
  if (typeof mode !== 'string' || !OFFLOAD_MODES.includes(/** @type {OffloadMode} */ (mode))) {
    throw new TypeError(`offload must be one of ${OFFLOAD_MODES.join(', ')}, got ${String(mode)}`)
  }
  return /** @type {OffloadMode} */ (mode)
}

/**
 * A provider for a dvai-mesh node. External mode returns the provider; managed mode
 * (`mode: 'managed'`) returns a promise that resolves once the spawned or reused serve is healthy.
 * @overload
 * @param {DvaiExternalOptions} [options]
 * @returns {DvaiCallableProvider}
 */
/**
 * @overload
 * @param {DvaiManagedOptions} options
 * @returns {Promise<import('./managed.js').ManagedDvaiProvider>}
 */
/**
 * @param {DvaiExternalOptions | DvaiManagedOptions} [options]
 * @returns {DvaiCallableProvider | Promise<import('./managed.js').ManagedDvaiProvider>}
 */
export function createDvai (options = {}) {
  if (options.mode === 'managed') {
    const managed = /** @type {DvaiManagedOptions} */ (options)
    // node:child_process is loaded only in managed mode.
    return import('./managed.js').then(({ createManagedDvai }) => createManagedDvai(managed))
  }
  if (options.mode !== undefined && options.mode !== 'external') {
    throw new TypeError(`mode must be 'external' or 'managed', got ${String(options.mode)}`)
  }
  return buildProvider({
    baseURL: options.baseURL ?? DEFAULT_BASE_URL,
    apiKey: options.apiKey ?? DEFAULT_API_KEY,
    headers: options.headers ?? {},
    fetch: options.fetch
  })
}

/**
 * The provider surface shared by both modes.
 * @param {{ baseURL: string, apiKey: string, headers: Record<string, string>, fetch?: typeof fetch }} settings
 * @returns {DvaiCallableProvider}
 */
export function buildProvider (settings) {
  /** @type {Map<string, ReturnType<typeof createOpenAICompatible>>} */
  const byOffload = new Map()
  /** @param {OffloadMode | undefined} offload */
  const inner = (offload) => {
    const key = offload === undefined ? '' : checkOffload(offload)
    let provider = byOffload.get(key)
    if (provider === undefined) {
      provider = createOpenAICompatible({
        name: 'dvai',
        baseURL: settings.baseURL,
        apiKey: settings.apiKey,
        headers: offload === undefined ? settings.headers : { ...settings.headers, [OFFLOAD_HEADER]: key },
        fetch: settings.fetch,
        includeUsage: true
      })
      byOffload.set(key, provider)
    }
    return provider
  }
  /** @type {any} */
  const provider = (/** @type {string} */ modelId, /** @type {DvaiModelSettings} */ modelSettings = {}) =>
    inner(modelSettings.offload).chatModel(modelId)
  provider.baseURL = settings.baseURL
  provider.chatModel = provider
  provider.languageModel = provider
  provider.completionModel = (/** @type {string} */ modelId, /** @type {DvaiModelSettings} */ modelSettings = {}) =>
    inner(modelSettings.offload).completionModel(modelId)
  provider.embeddingModel = (/** @type {string} */ modelId) => inner(undefined).embeddingModel(modelId)
  provider.textEmbeddingModel = provider.embeddingModel
  return provider
}

/** A default external provider (`DEFAULT_BASE_URL`) for quick scripts. */
export const dvai = createDvai()
