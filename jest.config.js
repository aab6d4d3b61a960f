/** @type {import('jest').Config} */
module.exports = {
  // The host's typed-array constructors, which onnxruntime-node requires (see the file).
  testEnvironment: '<rootDir>/test/helpers/ort-environment.js',
  roots: ['<rootDir>/test'],
  globalSetup: '<rootDir>/test/helpers/global-setup.js',
  globalTeardown: '<rootDir>/test/helpers/global-teardown.js',
  testMatch: ['**/*.test.ts'],
  transform: {
    '^.+\\.ts$': ['ts-jest', { tsconfig: 'tsconfig.test.json' }],
    // onnx-buf ships only ES modules; Node loads them with require(esm), jest needs them compiled.
    '/node_modules/onnx-buf/.+\\.js$': ['ts-jest', { tsconfig: { allowJs: true, module: 'commonjs', isolatedModules: true } }],
  },
  transformIgnorePatterns: ['/node_modules/(?!onnx-buf/)'],
  // Service processes are spawned from dist/ (built by `make build`); the tests themselves run from source.
  testTimeout: 120000,
};
