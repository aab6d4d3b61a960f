// Several tests read the reference pipeline's data set: say at once, and clearly, when it is not there.
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');

module.exports = async () => {
  const dir = process.env.AXIS_UPSTREAM_DATA ? path.resolve(process.env.AXIS_UPSTREAM_DATA) : path.resolve(__dirname, '..', '..', '..', 'shared', 'upstream', 'data');
  if (!fs.existsSync(path.join(dir, 'roles', 'instructions'))) {
    throw new Error(`the reference data set is not at ${dir}: the tests read ../shared/upstream/data beside the checkout; clone the project beside ../shared, or set AXIS_UPSTREAM_DATA to that data directory`);
  }
  // Every temporary folder of this run (the tests', and the services' and tools' they start)
  // under one root that global-teardown.js removes: a full run writes gigabytes (the
  // full-scale runs' journals, the GPU kit's parts), which would otherwise pile up in the
  // machine's temporary folder run after run. The workers start after this and inherit it.
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'axis-test-run-'));
  process.env.AXIS_TEST_RUN_TMP = root;
  process.env.TMPDIR = root;
};
