/**
 * Versions of what the services keep on disk (the ledger's schema, the aggregation's journal
 * and checkpoints, a run's manifest). A release reads every older version (migrating it where
 * the format changed) and refuses a newer one, which only a newer release understands,
 * instead of misreading it.
 */

/** State written by a newer release: the message says which, and what to do. */
export class NewerFormat extends Error {}

/** Throws NewerFormat when `found` is above what this release reads. */
export function checkFormatVersion(what: string, where: string, found: number, supported: number): void {
  if (!Number.isInteger(found) || found < 0) throw new NewerFormat(`${where}: ${what} carries format version ${JSON.stringify(found)}, which no release writes: the file was changed by hand or damaged`);
  if (found > supported) {
    throw new NewerFormat(`${where}: ${what} is in format version ${found}, written by a newer release; this one reads up to version ${supported}. Run the newer release again, or restore a copy made before the upgrade`);
  }
}
