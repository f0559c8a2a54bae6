// Typed errors of managed mode, one per failure, each with a stable `.code`.
// The codes are the same strings as Python's `node.managed.ManagedErrorCode`.

/** @enum {string} */
export const DvaiManagedErrorCode = Object.freeze({
  UNKNOWN_MODEL: 'unknown_model',
  DUPLICATE_MODEL: 'duplicate_model',
  MULTIPLE_DEFAULT_MODELS: 'multiple_default_models',
  BINARY_NOT_FOUND: 'binary_not_found',
  SERVE_START_TIMEOUT: 'serve_start_timeout',
  SERVE_SPAWN_FAILED: 'serve_spawn_failed',
  SERVE_EXITED: 'serve_exited',
  PORT_ALLOCATION_FAILED: 'port_allocation_failed'
})

/** Base of every managed-mode failure; `code` says which. */
export class DvaiManagedModeError extends Error {
  /**
   * @param {string} message
   * @param {string} code one of DvaiManagedErrorCode
   * @param {{ cause?: unknown }} [options]
   */
  constructor (message, code, options) {
    super(message, options)
    this.name = new.target.name
    /** @type {string} */
    this.code = code
  }
}

export class UnknownManagedModelError extends DvaiManagedModeError {
  /** @param {string} message @param {{ cause?: unknown }} [options] */
  constructor (message, options) { super(message, DvaiManagedErrorCode.UNKNOWN_MODEL, options) }
}

export class DuplicateManagedModelError extends DvaiManagedModeError {
  /** @param {string} message @param {{ cause?: unknown }} [options] */
  constructor (message, options) { super(message, DvaiManagedErrorCode.DUPLICATE_MODEL, options) }
}

export class MultipleDefaultManagedModelsError extends DvaiManagedModeError {
  /** @param {string} message @param {{ cause?: unknown }} [options] */
  constructor (message, options) { super(message, DvaiManagedErrorCode.MULTIPLE_DEFAULT_MODELS, options) }
}

/** The `dvai-node` executable (the reference's CLI) cannot be found. */
export class BinaryNotFoundError extends DvaiManagedModeError {
  /** @param {string} message @param {{ cause?: unknown }} [options] */
  constructor (message, options) { super(message, DvaiManagedErrorCode.BINARY_NOT_FOUND, options) }
}

/** The reference's name for BinaryNotFoundError. */
export const CliNotFoundError = BinaryNotFoundError

export class ServeStartTimeoutError extends DvaiManagedModeError {
  /** @param {string} message @param {{ cause?: unknown }} [options] */
  constructor (message, options) { super(message, DvaiManagedErrorCode.SERVE_START_TIMEOUT, options) }
}

export class ServeSpawnFailedError extends DvaiManagedModeError {
  /** @param {string} message @param {{ cause?: unknown }} [options] */
  constructor (message, options) { super(message, DvaiManagedErrorCode.SERVE_SPAWN_FAILED, options) }
}

export class ServeExitedError extends DvaiManagedModeError {
  /** @param {string} message @param {{ cause?: unknown }} [options] */
  constructor (message, options) { super(message, DvaiManagedErrorCode.SERVE_EXITED, options) }
}

export class PortAllocationFailedError extends DvaiManagedModeError {
  /** @param {string} message @param {{ cause?: unknown }} [options] */
  constructor (message, options) { super(message, DvaiManagedErrorCode.PORT_ALLOCATION_FAILED, options) }
}

/** @type {Record<string, new (message: string, options?: { cause?: unknown }) => DvaiManagedModeError>} */
export const ERRORS_BY_CODE = {
  [DvaiManagedErrorCode.UNKNOWN_MODEL]: UnknownManagedModelError,
  [DvaiManagedErrorCode.DUPLICATE_MODEL]: DuplicateManagedModelError,
  [DvaiManagedErrorCode.MULTIPLE_DEFAULT_MODELS]: MultipleDefaultManagedModelsError,
  [DvaiManagedErrorCode.BINARY_NOT_FOUND]: BinaryNotFoundError,
  [DvaiManagedErrorCode.SERVE_START_TIMEOUT]: ServeStartTimeoutError,
  [DvaiManagedErrorCode.SERVE_SPAWN_FAILED]: ServeSpawnFailedError,
  [DvaiManagedErrorCode.SERVE_EXITED]: ServeExitedError,
  [DvaiManagedErrorCode.PORT_ALLOCATION_FAILED]: PortAllocationFailedError
}
