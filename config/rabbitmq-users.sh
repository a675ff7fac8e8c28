#!/bin/sh
# Docker Compose only: the rabbitmq service's entrypoint. It starts the broker as the image
# does (docker-entrypoint.sh rabbitmq-server) and, once the node is up, creates or updates
# Warren's two runtime users from environment variables, with the permissions that
# config/definitions.json gives warren-dispatcher and warren-worker (tests/tests/compose_file.rs
# checks that they agree). The admin is RabbitMQ's default user (RABBITMQ_DEFAULT_USER/PASS),
# so no guest is created. The passwords go to rabbitmqctl in a file only root can read,
# deleted at once, never on a command line. The healthcheck waits for /tmp/warren-users.ready.
set -eu

ready=/tmp/warren-users.ready
rm -f "$ready"

# Names and passwords go into AMQP URLs unescaped: letters, digits and . _ ~ - only.
check() {
    case $2 in
        "") echo "warren-users: $1 is not set (see README, Credentials)" >&2; exit 1 ;;
        *[!A-Za-z0-9._~-]*) echo "warren-users: $1 may hold only letters, digits and . _ ~ -" >&2; exit 1 ;;
    esac
}
dispatcher=${WARREN_DISPATCHER_USER:-warren-dispatcher}
worker=${WARREN_WORKER_USER:-warren-worker}
check WARREN_DISPATCHER_USER "$dispatcher"
check WARREN_WORKER_USER "$worker"
check WARREN_DISPATCHER_PASSWORD "${WARREN_DISPATCHER_PASSWORD:-}"
check WARREN_WORKER_PASSWORD "${WARREN_WORKER_PASSWORD:-}"

create_users() {
    until rabbitmqctl -q await_startup --timeout 10 >/dev/null 2>&1; do sleep 2; done
    file=$(umask 077 && mktemp)
    # The permissions of config/definitions.json (JSON strings: `\\.` is a regex `\.`).
    cat >"$file" <<JSON
{
  "users": [
    { "name": "$dispatcher", "password": "$WARREN_DISPATCHER_PASSWORD", "tags": [] },
    { "name": "$worker", "password": "$WARREN_WORKER_PASSWORD", "tags": [] }
  ],
  "permissions": [
    { "user": "$dispatcher", "vhost": "/", "configure": "^\$", "write": "^warren\\\\.(jobs|control|delay\\\\.21)\$", "read": "^\$" },
    { "user": "$worker", "vhost": "/", "configure": "^amq\\\\.gen-.*\$", "write": "^(warren\\\\.(jobs|dead|delay\\\\.21)|amq\\\\.default|amq\\\\.gen-.*)\$", "read": "^(default|demo|warren\\\\.control|amq\\\\.gen-.*)\$" }
  ]
}
JSON
    chown rabbitmq "$file" 2>/dev/null || true
    if rabbitmqctl -q import_definitions "$file" >/dev/null; then
        touch "$ready"
        echo "warren-users: users $dispatcher and $worker are ready"
    else
        echo "warren-users: creating the users failed" >&2
    fi
    rm -f "$file"
}

create_users &
exec docker-entrypoint.sh rabbitmq-server
