import { randomBytes } from 'node:crypto';
import * as path from 'node:path';
import koffi from 'koffi';

/**
 * onnxruntime's C API, reached from TypeScript through koffi (a foreign-function library) in
 * the `libonnxruntime.so.1` that onnxruntime-node ships, so that the library and the stock
 * binding are one. The API is a table of function pointers that `OrtGetApiBase()->GetApi(v)`
 * returns; a function's place in the table never changes once released, so each one used
 * here is declared by its index and its C signature, in our own words. Only what the step
 * engine needs is declared.
 */

/** The API version these declarations were written against (onnxruntime 1.22; every function used exists since 1.11). */
export const C_API_VERSION = 22;

/** An onnxruntime object (session, value, binding...) or raw memory: an address. */
export type Handle = bigint;

/** onnxruntime said no: the message is its own, with what we were doing. */
export class OrtCallError extends Error {}

/** ONNX element types, as the C API numbers them. */
export const ELEMENT = { float32: 1, int32: 6, int64: 7, bool: 9, float16: 10, bfloat16: 16 } as const;
export type ElementName = keyof typeof ELEMENT;
export const ELEMENT_BYTES: Record<ElementName, number> = { float32: 4, int32: 4, int64: 8, bool: 1, float16: 2, bfloat16: 2 };

// Enum values of the C API used below.
const LOG_WARNING = 2;
const GRAPH_OPTIMIZE_ALL = 99;
const GRAPH_OPTIMIZE_NONE = 0;
const DEVICE_ALLOCATOR = 0;
const MEM_TYPE_DEFAULT = 0;

/** [index in the function table, C signature] of every function used. */
const FUNCTIONS = {
  GetErrorMessage: [2, 'const char* f(void* status)'],
  CreateEnv: [3, 'void* f(int level, const char* logid, _Out_ void** env)'],
  CreateSession: [7, 'void* f(void* env, const char* path, void* options, _Out_ void** session)'],
  CreateSessionFromArray: [8, 'void* f(void* env, const void* data, size_t bytes, void* options, _Out_ void** session)'],
  CreateSessionOptions: [10, 'void* f(_Out_ void** options)'],
  SetSessionGraphOptimizationLevel: [23, 'void* f(void* options, int level)'],
  SetIntraOpNumThreads: [24, 'void* f(void* options, int threads)'],
  SessionGetInputCount: [30, 'void* f(void* session, _Out_ size_t* count)'],
  SessionGetOutputCount: [31, 'void* f(void* session, _Out_ size_t* count)'],
  SessionGetInputName: [36, 'void* f(void* session, size_t index, void* allocator, _Out_ void** name)'],
  SessionGetOutputName: [37, 'void* f(void* session, size_t index, void* allocator, _Out_ void** name)'],
  CreateTensorAsOrtValue: [48, 'void* f(void* allocator, const int64_t* shape, size_t rank, int type, _Out_ void** value)'],
  CreateTensorWithDataAsOrtValue: [49, 'void* f(void* info, void* data, size_t bytes, const int64_t* shape, size_t rank, int type, _Out_ void** value)'],
  GetTensorMutableData: [51, 'void* f(void* value, _Out_ void** data)'],
  CreateMemoryInfo: [68, 'void* f(const char* name, int allocator, int device, int memType, _Out_ void** info)'],
  CreateCpuMemoryInfo: [69, 'void* f(int allocator, int memType, _Out_ void** info)'],
  AllocatorFree: [76, 'void* f(void* allocator, void* p)'],
  GetAllocatorWithDefaultOptions: [78, 'void* f(_Out_ void** allocator)'],
  ReleaseEnv: [92, 'void f(void* env)'],
  ReleaseStatus: [93, 'void f(void* status)'],
  ReleaseMemoryInfo: [94, 'void f(void* info)'],
  ReleaseSession: [95, 'void f(void* session)'],
  ReleaseValue: [96, 'void f(void* value)'],
  ReleaseSessionOptions: [100, 'void f(void* options)'],
  CreateAllocator: [131, 'void* f(void* session, void* info, _Out_ void** allocator)'],
  ReleaseAllocator: [132, 'void f(void* allocator)'],
  RunWithBinding: [133, 'void* f(void* session, void* runOptions, void* binding)'],
  CreateIoBinding: [134, 'void* f(void* session, _Out_ void** binding)'],
  ReleaseIoBinding: [135, 'void f(void* binding)'],
  BindInput: [136, 'void* f(void* binding, const char* name, void* value)'],
  BindOutput: [137, 'void* f(void* binding, const char* name, void* value)'],
  GetBoundOutputValues: [140, 'void* f(void* binding, void* allocator, _Out_ void** values, _Out_ size_t* count)'],
  ClearBoundInputs: [141, 'void f(void* binding)'],
  ClearBoundOutputs: [142, 'void f(void* binding)'],
  SessionOptionsAppendExecutionProvider_CUDA_V2: [204, 'void* f(void* options, void* cudaOptions)'],
  CreateCUDAProviderOptions: [205, 'void* f(_Out_ void** cudaOptions)'],
  UpdateCUDAProviderOptions: [206, 'void* f(void* cudaOptions, const char** keys, const char** values, size_t count)'],
  ReleaseCUDAProviderOptions: [208, 'void f(void* cudaOptions)'],
} as const;

/**
 * koffi names every prototype, once per process (and one process may load this module more
 * than once, as a test runner does): a fresh name for each.
 */
const PREFIX = `axis_ort_${randomBytes(6).toString('hex')}`;
let prototypes = 0;
const proto = (signature: string) => koffi.proto(signature.replace(' f(', ` ${PREFIX}_${prototypes++}(`));

type Fn = ((...args: unknown[]) => unknown) & { async: (...args: unknown[]) => void };
type Functions = { -readonly [K in keyof typeof FUNCTIONS]: Fn };

/** onnxruntime-node's own copy of the library (the stock binding loads the same file). */
export function libraryPath(): string {
  const pkg = path.dirname(require.resolve('onnxruntime-node/package.json'));
  return path.join(pkg, 'bin', 'napi-v6', `${process.platform}`, `${process.arch}`, process.platform === 'win32' ? 'onnxruntime.dll' : 'libonnxruntime.so.1');
}

/** The C API of one library, loaded once per process. */
export class OrtApi {
  private static loaded: OrtApi | undefined;
  readonly fn: Functions;
  readonly version: string;
  /** The process's one onnxruntime environment. */
  readonly env: Handle;
  /** onnxruntime's default CPU allocator, and a description of plain host memory. */
  readonly cpuAllocator: Handle;
  readonly hostMemory: Handle;

  /** A fresh handle on a library (tests; the service uses `get`). */
  static open(file: string, version = C_API_VERSION): OrtApi {
    return new OrtApi(file, version);
  }

  private constructor(file: string, version: number) {
    let lib: ReturnType<typeof koffi.load>;
    try {
      lib = koffi.load(file);
    } catch (err) {
      throw new OrtCallError(`cannot load onnxruntime's library ${file}: ${(err as Error).message}`);
    }
    const base = lib.func('void* OrtGetApiBase()')() as Handle;
    const [getApi, getVersion] = koffi.decode(base, 'void*', 2) as Handle[];
    this.version = koffi.call(getVersion, proto('const char* f()')) as string;
    const table = koffi.call(getApi, proto('void* f(uint32_t version)'), version) as Handle | null;
    if (!table) throw new OrtCallError(`${file} is onnxruntime ${this.version}, whose C API is older than version ${version} (onnxruntime 1.${version}), which the native binding needs`);
    const pointers = koffi.decode(table, 'void*', 210) as Handle[];
    const fn = {} as Functions;
    for (const [name, [index, signature]] of Object.entries(FUNCTIONS)) fn[name as keyof Functions] = koffi.decode(pointers[index], proto(signature)) as Fn;
    this.fn = fn;
    this.env = this.out((o) => fn.CreateEnv(LOG_WARNING, 'assistant-axis', o), 'creating the environment');
    this.cpuAllocator = this.out((o) => fn.GetAllocatorWithDefaultOptions(o), 'getting the CPU allocator');
    this.hostMemory = this.out((o) => fn.CreateCpuMemoryInfo(DEVICE_ALLOCATOR, MEM_TYPE_DEFAULT, o), 'describing host memory');
  }

  static get(file = libraryPath()): OrtApi {
    OrtApi.loaded ??= new OrtApi(file, C_API_VERSION);
    return OrtApi.loaded;
  }

  /** Throws the message of a non-null status (and frees it). */
  check(status: unknown, doing: string): void {
    if (!status) return;
    const message = this.fn.GetErrorMessage(status) as string;
    this.fn.ReleaseStatus(status);
    throw new OrtCallError(`onnxruntime, ${doing}: ${message}`);
  }

  /** Calls a function whose last argument is an out-pointer, and returns what it wrote. */
  out(call: (out: [Handle | null]) => unknown, doing: string): Handle {
    const slot: [Handle | null] = [null];
    this.check(call(slot), doing);
    if (slot[0] === null) throw new OrtCallError(`onnxruntime, ${doing}: returned nothing`);
    return slot[0];
  }

  /** Runs a status-returning function on a worker thread (a run takes long; the event loop goes on). */
  async callAsync(f: Fn, args: unknown[], doing: string): Promise<void> {
    const status = await new Promise<unknown>((resolve, reject) => f.async(...args, (err: unknown, result: unknown) => (err ? reject(err) : resolve(result))));
    this.check(status, doing);
  }

  /** A NUL-terminated string onnxruntime allocated with the CPU allocator, read and freed. */
  takeString(p: Handle): string {
    const text = koffi.decode(p, 'char', -1) as string;
    this.fn.AllocatorFree(this.cpuAllocator, p);
    return text;
  }

  /** The memory of a device, for allocating there (CUDA) or describing tensors there. */
  deviceMemory(provider: 'cpu' | 'cuda', deviceId: number): Handle {
    if (provider === 'cpu') return this.hostMemory;
    return this.out((o) => this.fn.CreateMemoryInfo('Cuda', DEVICE_ALLOCATOR, deviceId, MEM_TYPE_DEFAULT, o), `describing the memory of CUDA device ${deviceId}`);
  }

  static readonly optimizeAll = GRAPH_OPTIMIZE_ALL;
  static readonly optimizeNone = GRAPH_OPTIMIZE_NONE;
}
