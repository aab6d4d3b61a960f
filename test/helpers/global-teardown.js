// The run's temporary folders (global-setup.js), removed unless AXIS_KEEP_TEST_TMP=1 asks to
// keep them (to look at a failed test's files).
const fs = require('node:fs');

module.exports = async () => {
  const root = process.env.AXIS_TEST_RUN_TMP;
  if (!root) return;
  if (process.env.AXIS_KEEP_TEST_TMP === '1') {
    process.stderr.write(`the test run's temporary folders are kept in ${root}\n`);
    return;
  }
  try {
    fs.rmSync(root, { recursive: true, force: true, maxRetries: 5, retryDelay: 200 });
  } catch (err) {
    process.stderr.write(`could not remove the test run's temporary folders in ${root}: ${err.message}\n`);
  }
};
