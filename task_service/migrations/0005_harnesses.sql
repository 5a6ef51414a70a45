-- A remote role names a harness (a program the machine's own daemon configuration
-- defines) or, for machines whose owner allows it, a free-form command line; never
-- neither, never both. Start commands carry what they start.
ALTER TABLE tasks.roles ADD COLUMN harness text
    CHECK (harness IS NULL OR length(harness) BETWEEN 1 AND 64);
UPDATE tasks.roles SET harness = 'unset' WHERE kind = 'remote' AND command IS NULL;
ALTER TABLE tasks.roles ADD CONSTRAINT remote_runs_one_thing CHECK (
    kind <> 'remote' OR ((harness IS NULL) <> (command IS NULL)));
ALTER TABLE tasks.roles ADD CONSTRAINT command_size CHECK (
    command IS NULL OR length(command) BETWEEN 1 AND 4096);
ALTER TABLE tasks.commands ADD COLUMN harness text;
