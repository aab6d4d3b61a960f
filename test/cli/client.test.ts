import { isLoopbackAddress } from '../../services/cli/client';

/** Where the axis CLI may send a bearer token without TLS: this machine only. */
describe('isLoopbackAddress', () => {
  it.each([
    ['127.0.0.1:50051', true],
    ['127.3.2.1:1', true],
    ['localhost:50051', true],
    ['LOCALHOST', true],
    ['[::1]:50051', true],
    ['::1', true],
    ['dns:///localhost:50051', true],
    ['10.0.0.5:50051', false],
    ['axis-coordinator.research.svc:50051', false],
    ['localhost.evil.example:50051', false],
    ['127.0.0.1.nip.io:50051', false],
    ['[2001:db8::1]:50051', false],
    ['0.0.0.0:50051', false],
  ])('%s -> %s', (address, loopback) => {
    expect(isLoopbackAddress(address)).toBe(loopback);
  });
});
