# frozen_string_literal: true

module Thruster
  VERSION = "0.1.0"
end
