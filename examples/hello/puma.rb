# frozen_string_literal: true

# Puma listens privately on loopback at PORT, which thrust sets.
bind "tcp://127.0.0.1:#{ENV.fetch('PORT')}"
threads 1, 5
