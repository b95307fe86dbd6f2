"""The QU-net++ MONAI Label app's code, by job: `tasks` (infer, train, scoring, Next sample), `datastore` (local
folder and DICOMweb, the SQLite records, crash recovery) and `server` (request checks, uploads, errors, processes,
the temporary folder, the status page)."""
