// Several tests read the reference pipeline's data set: say at once, and clearly, when it is not there.
const fs = require('node:fs');
const path = require('node:path');

module.exports = async () => {
  const dir = process.env.AXIS_UPSTREAM_DATA ? path.resolve(process.env.AXIS_UPSTREAM_DATA) : path.resolve(__dirname, '..', '..', '..', 'shared', 'upstream', 'data');
  if (!fs.existsSync(path.join(dir, 'roles', 'instructions'))) {
    throw new Error(`the reference data set is not at ${dir}: the tests read ../shared/upstream/data beside the checkout; clone the project beside ../shared, or set AXIS_UPSTREAM_DATA to that data directory`);
  }
};
