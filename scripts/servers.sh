# Starting the database servers the tests and the fault-injection suite need: sourced by
# scripts/test and scripts/chaos (which define `fail`). Each server is started when it is down;
# one that cannot be reached stops the script (its tests would fail anyway).

# Waits up to 60 s for a command to succeed.
wait_for() {
    local what="$1"; shift
    for _ in $(seq 1 60); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    fail "$what did not come up within 60 s"
}

ensure_postgres() {
    if ! pg_isready -h 127.0.0.1 -p 5432 -q; then
        echo "starting PostgreSQL"
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start \
            || fail "PostgreSQL could not be started"
    fi
    wait_for "PostgreSQL on 127.0.0.1:5432" pg_isready -h 127.0.0.1 -p 5432 -q
    # The write-ahead-log relay reads a logical replication slot: wal_level must be logical,
    # which takes a restart.
    if [[ "$(psql -h 127.0.0.1 -U postgres -tAc "SHOW wal_level" postgres)" != logical ]]; then
        echo "setting wal_level = logical and restarting PostgreSQL"
        psql -h 127.0.0.1 -U postgres -qc "ALTER SYSTEM SET wal_level = logical" postgres
        pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main restart \
            || fail "PostgreSQL could not be restarted"
        wait_for "PostgreSQL on 127.0.0.1:5432" pg_isready -h 127.0.0.1 -p 5432 -q
    fi
    if ! psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'test'" postgres | grep -q 1; then
        psql -h 127.0.0.1 -U postgres -c "CREATE DATABASE test" postgres >/dev/null
    fi
    # Every other user is trusted; the role `outbox_pgpass` must give its password (SCRAM), so
    # that a test can show a relay authenticating with the password file's (outbox-cli's
    # `a_wal_relay_whose_password_is_only_in_the_password_file_streams_with_it`).
    local hba
    hba="$(psql -h 127.0.0.1 -U postgres -tAc "SHOW hba_file" postgres)"
    if ! grep -q '^host all outbox_pgpass ' "$hba"; then
        echo "pg_hba.conf: outbox_pgpass authenticates with a password"
        sed -i '0,/^host/s//host all outbox_pgpass 127.0.0.1\/32 scram-sha-256\nhost/' "$hba"
        psql -h 127.0.0.1 -U postgres -qtAc "SELECT pg_reload_conf()" postgres >/dev/null
    fi
}

# A run that failed may have left its replication slots, which keep the server's WAL: drop the
# idle slots of the tests (`outbox_t…`) and of the fault-injection runs (`outbox_c…`). Only
# while nothing else runs.
drop_idle_test_slots() {
    psql -h 127.0.0.1 -U postgres -qtAc "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE (slot_name LIKE 'outbox\_t%' OR slot_name LIKE 'outbox\_c%') AND NOT active" postgres >/dev/null
}

ensure_mariadb() {
    if ! mysqladmin -h 127.0.0.1 -u root ping >/dev/null 2>&1; then
        echo "starting MariaDB"
        start-stop-daemon --start --oknodo --background --exec /usr/sbin/mariadbd \
            || fail "MariaDB could not be started"
    fi
    wait_for "MariaDB on 127.0.0.1:3306" mysqladmin -h 127.0.0.1 -u root ping
    mysql -h 127.0.0.1 -u root -e "CREATE DATABASE IF NOT EXISTS test"
}
